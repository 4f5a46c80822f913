"""rbee's core: jobs, their states, events, runs and store, in plain Python.

Nothing here imports Ray or any library from outside the standard library (a test holds
it to that): the actors around it hand it their work, and tests drive it without a cluster.
"""
