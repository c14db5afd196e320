//! Server half of Kubernetes API access: authenticate CI jobs and users, authorize them against
//! the agent's configuration, and route their requests through the reverse tunnel.
