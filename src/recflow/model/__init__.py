"""The batch model: features, candidates, ranker, training, bundle, metrics, evaluation."""
