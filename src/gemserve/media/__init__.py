"""Media a request or an upload brings (documents, images, audio, video, text files) and what a model reads of them."""
