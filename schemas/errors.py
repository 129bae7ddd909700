"""Names of the failure types that cross process boundaries: an activity raises one, a
workflow or the API decides by it. One definition each, so the raiser and the reader agree."""

USER_ERROR = "UserError"  # the user can fix it (data, config, paths): fail at once, never retried
OUT_OF_MEMORY = "OutOfMemory"  # a chunk did not fit: the workflow retries with a smaller micro-batch
NO_GPU_WORKER = "NoGpuWorker"  # nothing polls the hardware queue: say so instead of waiting
WORKER_SHUTDOWN = "WorkerShutdown"  # the GPU worker is stopping: retried on another one
RUN_FAILED = "RunFailed"  # how a run's workflow ends when it failed, with the reason as message
