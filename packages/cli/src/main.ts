#!/usr/bin/env node
import { readFileSync } from "node:fs";
import { toJson } from "@bufbuild/protobuf";
import { HostInfoSchema, HostService } from "@vmenv/api/agent/v1";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import { Command, Option } from "commander";
import { agentCommands } from "./agent.js";
import { diagCommands } from "./diag.js";
import { envCommands } from "./env.js";
import { describeError } from "./errors.js";
import { gpuCommands } from "./gpu.js";
import { hostInfoTable } from "./host.js";
import { networkCommands } from "./network.js";
import { opCommands } from "./op.js";
import { treeCommands } from "./tree.js";
import { vmCommands } from "./vm.js";

const CLI_VERSION = (
  JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string }
).version;

interface GlobalOptions {
  socket: string;
  address?: string;
  tls?: boolean;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  tlsServerName?: string;
  output: "table" | "json";
  timeout: string;
  coordinator: string;
}

const program = new Command("vmenv")
  .description(
    "vmenv: run and inspect VMs through a vmenv-agent, and environments through a vmenv-coordinator",
  )
  .version(CLI_VERSION, "--client-version", "print the CLI's version only")
  .addOption(
    new Option("--socket <path>", "Unix socket of the local agent")
      .env("VMENV_SOCKET")
      .default("/run/vmenv/agent.sock"),
  )
  .addOption(
    new Option("--address <host:port>", "TCP address of an agent (instead of --socket)").env("VMENV_ADDRESS"),
  )
  .addOption(
    new Option("--tls", "use TLS on --address (implied by the other --tls-* flags)").env("VMENV_TLS"),
  )
  .addOption(
    new Option("--tls-ca <file>", "PEM CA bundle the server certificate must chain to").env("VMENV_TLS_CA"),
  )
  .addOption(new Option("--tls-cert <file>", "PEM client certificate, for mutual TLS").env("VMENV_TLS_CERT"))
  .addOption(new Option("--tls-key <file>", "PEM key of --tls-cert").env("VMENV_TLS_KEY"))
  .addOption(
    new Option("--tls-server-name <name>", "name to verify the server certificate against").env(
      "VMENV_TLS_SERVER_NAME",
    ),
  )
  .addOption(
    new Option("-o, --output <format>", "output format")
      .choices(["table", "json"])
      .env("VMENV_OUTPUT")
      .default("table"),
  )
  .addOption(new Option("--timeout <ms>", "deadline of each call").env("VMENV_TIMEOUT").default("30000"))
  .addOption(
    new Option(
      "--coordinator <socket|host:port>",
      "the coordinator, for `tree`, `agent`, `env` and `op`: a Unix socket path or a TCP address",
    )
      .env("VMENV_COORDINATOR")
      .default("/run/vmenv/coordinator.sock"),
  )
  .showHelpAfterError();

function clientConfig(): ClientConfig {
  const o = program.opts<GlobalOptions>();
  const timeoutMs = Number(o.timeout);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0)
    throw new Error(`--timeout must be a positive integer, got "${o.timeout}"`);
  const read = (f: string | undefined) => (f === undefined ? undefined : readFileSync(f));
  const wantsTls = o.tls || o.tlsCa || o.tlsCert || o.tlsKey || o.tlsServerName;
  if (wantsTls && !o.address) throw new Error("--tls* flags need --address (the Unix socket has no TLS)");
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined))
    throw new Error("--tls-cert and --tls-key go together");
  if (o.address) {
    const tls = wantsTls
      ? {
          ...(o.tlsCa ? { ca: read(o.tlsCa) } : {}),
          ...(o.tlsCert ? { cert: read(o.tlsCert), key: read(o.tlsKey) } : {}),
          ...(o.tlsServerName ? { serverName: o.tlsServerName } : {}),
        }
      : undefined;
    return { address: o.address, timeoutMs, ...(tls ? { tls } : {}) };
  }
  return { socket: o.socket, timeoutMs };
}

/** Where the coordinator commands (`tree`, `agent`, `env`, `op`) connect: --coordinator's socket or address. */
function coordinatorConfig(): ClientConfig {
  const o = program.opts<GlobalOptions>();
  const timeoutMs = Number(o.timeout);
  if (!Number.isInteger(timeoutMs) || timeoutMs <= 0)
    throw new Error(`--timeout must be a positive integer, got "${o.timeout}"`);
  return o.coordinator.includes("/")
    ? { socket: o.coordinator, timeoutMs }
    : { address: o.coordinator, timeoutMs };
}

function print(json: unknown, text: () => string): void {
  const { output } = program.opts<GlobalOptions>();
  process.stdout.write(`${output === "json" ? JSON.stringify(json, null, 2) : text()}\n`);
}

program
  .command("version")
  .description("print the versions of the CLI and of the agent it talks to")
  .action(async () => {
    const host = createDaemonClient(HostService, clientConfig());
    const info = await host.getHostInfo({});
    print({ client: CLI_VERSION, agent: info.agentVersion, host: info.hostname }, () =>
      [`vmenv ${CLI_VERSION}`, `vmenv-agent ${info.agentVersion} on ${info.hostname}`].join("\n"),
    );
  });

const host = program.command("host").description("the host an agent runs on");
host
  .command("info")
  .description("inventory of the host: CPUs, NUMA nodes, memory, huge pages, VMMs, accelerators")
  .action(async () => {
    const info = await createDaemonClient(HostService, clientConfig()).getHostInfo({});
    print(toJson(HostInfoSchema, info), () => hostInfoTable(info));
  });

vmCommands(program, clientConfig, print);
gpuCommands(program, clientConfig, print);
networkCommands(program, clientConfig, print);
diagCommands(program, clientConfig, print);
// Coordinator commands take `coordinatorConfig` instead of `clientConfig`.
opCommands(program, coordinatorConfig, print);
void coordinatorConfig;
treeCommands(program, coordinatorConfig, print);
agentCommands(program, coordinatorConfig, print);
envCommands(program, coordinatorConfig, print);

try {
  await program.parseAsync(process.argv);
} catch (err) {
  process.stderr.write(`${describeError(err)}\n`);
  process.exitCode = 1;
}
