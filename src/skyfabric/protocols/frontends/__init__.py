"""Client protocols: parse requests, encode answers and errors (OpenAI, Anthropic)."""
