"""rbee's HTTP face: the Starlette ingress on Ray Serve, the CLI and the Python client."""
