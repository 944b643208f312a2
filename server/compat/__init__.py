"""What the OpenAI- and Anthropic-compatible routes share: resolving `model`, text and chat
templates, sampling through the engine workers, SSE and error bodies."""
