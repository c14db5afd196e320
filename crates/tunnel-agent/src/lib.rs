//! Agent half of the reverse tunnel: keeps a pool of idle streams open to kas, each serving
//! exactly one routed request, so every request has its own HTTP/2 flow control.
