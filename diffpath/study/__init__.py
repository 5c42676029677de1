"""The study: stages, artifact layout, error cache, evaluation, report, profiles, training."""
