"""
Generated protobuf code for C{proto/Message.proto}; regenerate, never edit.
"""
