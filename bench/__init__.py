"""`make bench`: what users pay for, measured against a bare forwarder on the same stack in the same run."""
