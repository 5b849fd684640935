"""The router's operations, one module each; `node.py` wires them."""
