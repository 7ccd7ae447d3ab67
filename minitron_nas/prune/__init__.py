"""Rank and prune: importance of every head, neuron, channel and layer; slicing a student along them."""
