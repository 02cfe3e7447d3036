"""Evaluation beyond a run's own loss: benchmark tasks scored as lm-evaluation-harness
scores them, and judges that compare two models' answers or grade one model's."""
