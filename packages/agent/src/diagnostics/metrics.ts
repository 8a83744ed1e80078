import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { Counter, collectDefaultMetrics, Gauge, Registry } from "prom-client";
import type { StatsSample } from "./stats.js";

type Labels = Record<string, string>;
type DiskKey = "readBytes" | "writeBytes" | "readOps" | "writeOps" | "flushOps";
type NicKey = "rxBytes" | "txBytes" | "rxPackets" | "txPackets" | "rxDropped" | "txDropped";

/**
 * The statistics as Prometheus metrics (prom-client): the same sample GetStatistics returns, taken when
 * /metrics is scraped, plus the agent process's own default metrics (`vmenv_agent_*`).
 */
export class StatsMetrics {
  readonly registry = new Registry();
  readonly #counters: Counter<string>[] = [];
  readonly #gauges: Gauge<string>[] = [];

  constructor(private readonly sample: () => Promise<StatsSample>) {
    collectDefaultMetrics({ register: this.registry, prefix: "vmenv_agent_" });
  }

  #counter(name: string, help: string, labelNames: string[]) {
    const c = new Counter({ name, help, labelNames, registers: [this.registry] });
    this.#counters.push(c);
    return c;
  }
  #gauge(name: string, help: string, labelNames: string[]) {
    const g = new Gauge({ name, help, labelNames, registers: [this.registry] });
    this.#gauges.push(g);
    return g;
  }

  readonly #hostCpu = this.#counter("vmenv_host_cpu_seconds_total", "host CPU time by mode", ["mode"]);
  readonly #hostLoad = this.#gauge("vmenv_host_load_average", "host load average", ["period"]);
  readonly #hostMem = this.#gauge("vmenv_host_memory_bytes", "host memory by kind", ["kind"]);
  readonly #running = this.#gauge("vmenv_host_running_vms", "VMs with a VMM process", []);
  readonly #vmCpu = this.#counter("vmenv_vm_cpu_seconds_total", "CPU time of the VMM process", ["vm"]);
  readonly #vcpu = this.#counter("vmenv_vm_vcpu_seconds_total", "CPU time of one vCPU thread", [
    "vm",
    "vcpu",
  ]);
  readonly #vcpuWait = this.#counter(
    "vmenv_vm_vcpu_wait_seconds_total",
    "time a vCPU waited for a host CPU",
    ["vm", "vcpu"],
  );
  readonly #mem = this.#gauge("vmenv_vm_memory_bytes", "memory the guest has", ["vm"]);
  readonly #rss = this.#gauge("vmenv_vm_memory_rss_bytes", "resident memory of the VMM process", ["vm"]);
  readonly #balloon = this.#gauge("vmenv_vm_balloon_actual_bytes", "memory the balloon leaves the guest", [
    "vm",
  ]);
  readonly #disk: Record<DiskKey, Counter<string>> = {
    readBytes: this.#counter("vmenv_vm_disk_read_bytes_total", "bytes read by a VM disk", ["vm", "disk"]),
    writeBytes: this.#counter("vmenv_vm_disk_written_bytes_total", "bytes written to a VM disk", [
      "vm",
      "disk",
    ]),
    readOps: this.#counter("vmenv_vm_disk_reads_total", "read requests of a VM disk", ["vm", "disk"]),
    writeOps: this.#counter("vmenv_vm_disk_writes_total", "write requests of a VM disk", ["vm", "disk"]),
    flushOps: this.#counter("vmenv_vm_disk_flushes_total", "flush requests of a VM disk", ["vm", "disk"]),
  };
  readonly #nic: Record<NicKey, Counter<string>> = {
    rxBytes: this.#counter("vmenv_vm_nic_receive_bytes_total", "bytes the guest received", ["vm", "nic"]),
    txBytes: this.#counter("vmenv_vm_nic_transmit_bytes_total", "bytes the guest sent", ["vm", "nic"]),
    rxPackets: this.#counter("vmenv_vm_nic_receive_packets_total", "packets the guest received", [
      "vm",
      "nic",
    ]),
    txPackets: this.#counter("vmenv_vm_nic_transmit_packets_total", "packets the guest sent", ["vm", "nic"]),
    rxDropped: this.#counter("vmenv_vm_nic_receive_dropped_total", "packets to the guest dropped", [
      "vm",
      "nic",
    ]),
    txDropped: this.#counter("vmenv_vm_nic_transmit_dropped_total", "packets from the guest dropped", [
      "vm",
      "nic",
    ]),
  };

  /** Takes a sample and renders every metric in the Prometheus text format. */
  async render(): Promise<string> {
    const s = await this.sample();
    // Counters hold the sampled cumulative values (a VM gone since the last scrape disappears).
    for (const m of [...this.#counters, ...this.#gauges]) m.reset();
    const set = (c: Counter<string>, labels: Labels, v: number) => c.inc(labels, Math.max(0, v));
    for (const [mode, ns] of Object.entries(s.host.cpu)) set(this.#hostCpu, { mode }, ns / 1e9);
    s.host.load.forEach((v, i) => {
      this.#hostLoad.set({ period: ["1m", "5m", "15m"][i] as string }, v);
    });
    this.#hostMem.set({ kind: "total" }, s.host.memory.totalBytes);
    this.#hostMem.set({ kind: "available" }, s.host.memory.availableBytes);
    this.#hostMem.set({ kind: "free" }, s.host.memory.freeBytes);
    this.#running.set(s.host.runningVms);
    for (const v of s.vms) {
      const vm = `vms/${v.id}`;
      set(this.#vmCpu, { vm }, v.cpuTimeNs / 1e9);
      for (const c of v.vcpus) {
        set(this.#vcpu, { vm, vcpu: String(c.index) }, c.cpuTimeNs / 1e9);
        set(this.#vcpuWait, { vm, vcpu: String(c.index) }, c.waitTimeNs / 1e9);
      }
      this.#mem.set({ vm }, Number(v.memoryBytes));
      this.#rss.set({ vm }, v.rssBytes);
      if (v.balloon) this.#balloon.set({ vm }, v.balloon.actualBytes);
      for (const d of v.disks)
        for (const [k, c] of Object.entries(this.#disk)) set(c, { vm, disk: d.deviceId }, d[k as DiskKey]);
      for (const n of v.nics)
        for (const [k, c] of Object.entries(this.#nic)) set(c, { vm, nic: n.deviceId }, n[k as NicKey]);
    }
    return this.registry.metrics();
  }

  /** Serves GET /metrics on host:port; resolves with the address it listens on. */
  async listen(
    host: string,
    port: number,
    onError: (err: unknown) => void,
  ): Promise<{ server: Server; address: string }> {
    const server = createServer((req, res) => {
      if (req.method !== "GET" || (req.url ?? "").split("?")[0] !== "/metrics") {
        res.writeHead(404, { "content-type": "text/plain" }).end("only GET /metrics is served here\n");
        return;
      }
      this.render().then(
        (text) => res.writeHead(200, { "content-type": this.registry.contentType }).end(text),
        (err: unknown) => {
          onError(err);
          res.writeHead(500, { "content-type": "text/plain" }).end("sampling failed; see the agent log\n");
        },
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    const a = server.address() as AddressInfo;
    return { server, address: a.family === "IPv6" ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}` };
  }
}
