from fray.cluster.base import Cluster


class LocalCluster(Cluster):
    @classmethod
    def from_spec(cls, query_params):
        return cls()

    def launch(self, request):
        raise NotImplementedError("stand-in")

    def poll(self, job_id):
        raise KeyError(job_id)

    def monitor(self, job_id):
        raise KeyError(job_id)

    def terminate(self, job_id):
        raise KeyError(job_id)

    def list_jobs(self):
        return []
