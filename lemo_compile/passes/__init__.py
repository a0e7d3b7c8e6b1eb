"""Graph passes: `select` and `loss` on the Dynamo graph, post-grad passes via `manager`."""
