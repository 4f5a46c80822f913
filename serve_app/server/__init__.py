"""The server: the Starlette ingress on Ray Serve (jobs, streams, cancel, OpenAI routes),
errors as HTTP answers, the deployment, and ``rbee serve``'s start and shutdown."""
