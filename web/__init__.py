"""What both HTTP servers (the Gradio UI and the API) share to stay private to the user's machine."""
