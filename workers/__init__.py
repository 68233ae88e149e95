"""RQ workers: run one afif job per RQ task, publish progress, reconcile lost jobs."""
