"""Runnable examples for aetcdcfg (``make run`` runs ``examples.demo``)."""
