"""Safety ratings: harm categories rated by a classifier and enforced as a request's safetySettings say
(docs/safety.md)."""
