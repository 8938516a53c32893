"""windtunnel: the gradient calculus of softmax attention and Bayesian wind tunnels.

Importing the package changes no global state (no seeding, no device choice, no warnings filters).
"""

__version__ = "0.2.0"
