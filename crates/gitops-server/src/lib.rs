//! Server half of GitOps: select manifest files by glob at a commit and stream them to agents.
