"""The data plane: listener → routes → (filters) → cluster → endpoint, OpenAI- and Anthropic-shaped."""
