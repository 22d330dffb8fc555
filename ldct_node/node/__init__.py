"""The node's data path: receive -> spool -> jobs -> worker -> send, with the daemon that runs them."""
