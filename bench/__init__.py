"""The agentstream benchmark: publisher, Kafka ceiling, a naive faust agent and the worker.

Run it with ``python -m bench.run`` (or ``agentstream bench``); see ``bench.run`` for what is
measured and how.
"""
