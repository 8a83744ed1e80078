#!/usr/bin/env node
// The floor of the RPC stack: the echo service served by the same kit (listeners, interceptors,
// logging, health, reflection) as vmenv-agent, in a process of its own.
// Usage: echo-server.mjs <socket path> <host:port>
import { createLogger, echoService, serve } from "@vmenv/rpc";

const [socket, listen] = process.argv.slice(2);
const [host, port] = listen.split(":");
const logger = createLogger("echo-server", "info");
const server = await serve({
  services: [echoService()],
  logger,
  unixSocket: { path: socket },
  tcp: { host, port: Number(port) },
});
logger.info({ unixSocket: server.unixSocket, tcpAddress: server.tcpAddress }, "echo-server ready");
process.on("SIGTERM", () => server.close(1000).then(() => process.exit(0)));
