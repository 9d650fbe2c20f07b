"""Wire protocols: build upstream requests, decode answers, classify errors, continue answers."""
