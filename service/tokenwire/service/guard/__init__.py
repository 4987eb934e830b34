"""The call guard: what every call passes before the servicer sees it.

    _interceptor   the grpc.aio interceptor: request id, metadata size, authentication,
                   decoding, policy, admission, the access-log line
    _auth          who may call: bearer tokens, client certificates, per-caller policy
    _admission     how much: concurrent model calls and request rates
    _http2         what gRPC core lets through below the guard, and the limits set on it
"""
