import { randomUUID } from "node:crypto";
import { toJson } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { type Network, NetworkSchema, NetworkService, type Port, PortSchema } from "@vmenv/api/agent/v1";
import { type ClientConfig, createDaemonClient } from "@vmenv/rpc";
import { type Command, InvalidArgumentError, Option } from "commander";
import { parseLabels } from "./agent.js";
import { keyValues, table } from "./output.js";

type Print = (json: unknown, text: () => string) => void;

/** "lan" or "networks/lan" → "networks/lan". */
export const networkName = (s: string) => (s.startsWith("networks/") ? s : `networks/${s}`);
const networkId = (name: string) => name.replace(/^networks\//, "");
const list = (xs: readonly string[]) => xs.map(networkId).join(",");
const time = (t: Network["createTime"]) => (t ? timestampDate(t).toISOString() : "-");

/** What sets a network apart besides its addresses: "isolate-ports peers=a,b", or "-". */
export function networkFlags(n: Network): string {
  const f = [
    n.isolatePorts && "isolate-ports",
    n.allowedPeers.length > 0 && `peers=${list(n.allowedPeers)}`,
    n.vlanId > 0 && `vlan=${n.vlanId}`,
    n.masquerade && "masquerade",
  ].filter((x): x is string => typeof x === "string");
  return f.join(" ") || "-";
}

export function networkTable(nets: readonly Network[]): string {
  return table(
    ["NETWORK", "BRIDGE", "CIDR", "GATEWAY", "UPLINK", "MTU", "PORTS", "FLAGS"],
    nets.map((n) => [
      networkId(n.name),
      n.bridgeName,
      n.cidr,
      n.gateway,
      n.uplink || "-",
      String(n.mtu || 1500),
      String(n.portCount),
      networkFlags(n),
    ]),
  );
}

export function networkDetail(n: Network): string {
  return keyValues([
    ["Name", n.name],
    ["Bridge", n.bridgeName],
    ["CIDR", n.cidr],
    ["Gateway", `${n.gateway} (${n.uplink ? "the segment's router" : "on the host's bridge"})`],
    ["Uplink", n.uplink || "none (local to this host)"],
    ["VLAN", n.vlanId ? String(n.vlanId) : "none"],
    ["MTU", String(n.mtu || 1500)],
    ["Isolate ports", n.isolatePorts ? "yes" : "no"],
    ["Allowed peers", n.allowedPeers.join(", ") || "none"],
    ["Masquerade", n.masquerade ? "yes" : "no"],
    [
      "Labels",
      Object.entries(n.labels)
        .map(([k, v]) => `${k}=${v}`)
        .join(", ") || "-",
    ],
    ["Ports", String(n.portCount)],
    ["Created", time(n.createTime)],
  ]);
}

export function portTable(ports: readonly Port[]): string {
  return table(
    ["NETWORK", "PORT", "VM", "NIC", "TAP", "MAC", "ADDRESS", "ACTIVE"],
    ports.map((p) => {
      const [, net = "", , port = ""] = p.name.split("/");
      return [
        net,
        port,
        p.vm.replace(/^vms\//, ""),
        p.nicId,
        p.tapName,
        p.macAddress,
        p.ipAddress,
        p.active ? "yes" : "no",
      ];
    }),
  );
}

/** `--mtu`: a whole number (what a uint32 holds); the agent judges its range. */
export function parseMtu(s: string): number {
  const n = Number(s);
  if (!/^\d+$/.test(s.trim()) || n > 0xffff_ffff) throw new InvalidArgumentError("not a number.");
  return n;
}

/** Every item of a List call, page after page. */
async function allPages<T>(list: (pageToken: string) => Promise<[T[], string]>): Promise<T[]> {
  const out: T[] = [];
  let pageToken = "";
  do {
    const [items, next] = await list(pageToken);
    out.push(...items);
    pageToken = next;
  } while (pageToken);
  return out;
}

/** `vmenv network …` */
export function networkCommands(program: Command, cfg: () => ClientConfig, print: Print): void {
  const network = program
    .command("network")
    .description("networks of the agent's host (a Linux bridge each) and their ports (a tap per VM NIC)");
  const client = () => createDaemonClient(NetworkService, cfg());
  const show = (n: Network) => print(toJson(NetworkSchema, n), () => networkDetail(n));

  network
    .command("create <network>")
    .description("create a network and its bridge (the same call again changes nothing)")
    .requiredOption("--cidr <cidr>", "IPv4 subnet, e.g. 10.20.0.0/24; port addresses come from it")
    .option("--gateway <ip>", "the guests' default gateway (default: the CIDR's first address)")
    .option("--bridge <name>", "name of the Linux bridge (default: vme- and a hash of the id)")
    .option("--uplink <ifname>", "host interface joining the network to a segment shared with other hosts")
    .addOption(new Option("--mtu <n>", "MTU of the bridge and its taps (default 1500)").argParser(parseMtu))
    .option("--isolate-ports", "guests reach only the gateway and allowed peers, not one another")
    .option("--allow-peer <network...>", "other networks whose guests this network's guests may reach")
    .option("--label <k=v...>", "labels")
    .action(async (id: string, o) => {
      const n = await client().createNetwork({
        networkId: networkId(id),
        requestId: randomUUID(),
        network: {
          cidr: o.cidr as string,
          gateway: (o.gateway as string | undefined) ?? "",
          bridgeName: (o.bridge as string | undefined) ?? "",
          uplink: (o.uplink as string | undefined) ?? "",
          mtu: (o.mtu as number | undefined) ?? 0,
          isolatePorts: Boolean(o.isolatePorts),
          allowedPeers: ((o.allowPeer as string[] | undefined) ?? []).map(networkName),
          labels: parseLabels((o.label as string[] | undefined) ?? []),
        },
      });
      show(n);
    });

  network
    .command("list")
    .description("the host's networks: bridge, CIDR, gateway, uplink, MTU, ports, isolation")
    .action(async () => {
      const c = client();
      const nets = await allPages(async (pageToken) => {
        const r = await c.listNetworks({ pageSize: 1000, pageToken });
        return [r.networks, r.nextPageToken];
      });
      print({ networks: nets.map((n) => toJson(NetworkSchema, n)) }, () => networkTable(nets));
    });

  network
    .command("get <network>")
    .description("one network, with its port count and create time")
    .action(async (n: string) => show(await client().getNetwork({ name: networkName(n) })));

  network
    .command("delete <network>")
    .description("remove a network, its bridge and its rules (refused while it has ports)")
    .option("--allow-missing", "succeed when it does not exist")
    .action(async (n: string, o: { allowMissing?: boolean }) => {
      const name = networkName(n);
      await client().deleteNetwork({ name, allowMissing: Boolean(o.allowMissing), requestId: randomUUID() });
      print({ deleted: name }, () => `deleted ${name}`);
    });

  network
    .command("ports [network]")
    .description("the ports (VM NICs) of one network, or of every network")
    .option("--vm <vm>", "only the ports of this VM")
    .action(async (n: string | undefined, o: { vm?: string }) => {
      const c = client();
      const ports = await allPages(async (pageToken) => {
        const r = await c.listPorts({
          parent: n ? networkName(n) : "networks/-",
          ...(o.vm ? { vm: o.vm.startsWith("vms/") ? o.vm : `vms/${o.vm}` } : {}),
          pageSize: 1000,
          pageToken,
        });
        return [r.ports, r.nextPageToken];
      });
      print({ ports: ports.map((p) => toJson(PortSchema, p)) }, () => portTable(ports));
    });
}
