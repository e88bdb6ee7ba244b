"""Device side of edgeshard: the rpyc control service, the data plane (wire) and shared-secret auth.

Modules: auth (HMAC handshake, token files), wire (frames, data server, shaped links), service (the device
server, `edgeshard serve`), client (DeviceClient, the controller's handle on one device).
"""
