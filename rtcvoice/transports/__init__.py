"""Transports adapt a network connection to a Conversation."""
