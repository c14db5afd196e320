//! Server half of the reverse tunnel: the registry of connected agents and their idle streams,
//! from which kas's modules take a tunnel to reach an agent.
