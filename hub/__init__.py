"""Hub access: parse what users type, list refs and files, download resumably with verification."""
