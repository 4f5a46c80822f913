"""rbee's Ray actors and the plain core they hand their work to."""
