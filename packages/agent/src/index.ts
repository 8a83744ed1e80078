export { type AgentConfig, agentCommand, ConfigError, parseListen, resolveConfig } from "./config.js";
export { AGENT_VERSION } from "./version.js";
export { type Agent, startAgent } from "./wire.js";
