"""worker_cpu: hosts the workflows and the CPU activities. Never touches a GPU."""
