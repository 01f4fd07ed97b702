"""Model adapters, block removal, hidden-state capture, data and selectors."""
