"""Pure: the plan of every step, no torch, no vLLM."""
