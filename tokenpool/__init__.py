"""What every layer of tokenpool shares and depends on nothing: the environment variables it reads (`env`)."""
