"""`tether envs` and `tether pods`: the fleet from a terminal, through a router's REST API only."""
