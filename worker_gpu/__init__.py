"""worker_gpu: GPU activities (eval, training); one activity per GPU, CPU fallback in dev and CI."""
