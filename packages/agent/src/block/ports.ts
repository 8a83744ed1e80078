/**
 * What the VM side needs of block storage, and what block storage needs of the VM side. Both are small
 * ports so that neither imports the other's internals.
 */

/** A volume as a VMM opens it. */
export interface VolumeFile {
  /** `volumes/{volume}`. */
  name: string;
  /** Absolute path of the image file. */
  path: string;
  format: "raw" | "qcow2";
  sizeBytes: bigint;
}

/** Resolves volume names for VM disks (implemented by the block service). */
export interface VolumeResolver {
  /** The file behind `volumes/{id}`; NOT_FOUND (reason VOLUME_NOT_FOUND, metadata volume) when there is none. */
  resolve(volumeName: string): Promise<VolumeFile>;
}

/** Answers "which VMs use this volume?" (implemented by the VM side, from the VMs' devices; seed 002). */
export type VolumeUsers = (volumeName: string) => string[];
