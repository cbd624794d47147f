import type pg from 'pg';
import { attestationSummary, describeAttestation, findKeyAttestations } from '../../../registry/attestation-store.js';
import { CANDIDATE_ROWS_QUERY } from '../../../registry/queries.js';
import { registryTarget, type CommandContext, type CommandResult } from '../context.js';
import { withRegistry } from '../database.js';
import { DEFAULT_IDENTITY_OID } from '../environment.js';
import { EXIT, UsageError } from '../errors.js';
import { explain, explanationLines, preliminaryChecks, type Explanation, type ExplainInput } from '../explanation.js';
import { checkOid, readSubjectKey, type SubjectKeyOptions } from '../subject-key.js';

export interface ExplainOptions extends SubjectKeyOptions {
  readonly oid?: string;
}

/** The gateway's own lookup for one CONNECT; the gateway sends the same three values. */
export async function candidateRows(db: Pick<pg.ClientBase, 'query'>, identity: string, destination: string, spkiDer: Buffer): Promise<unknown[]> {
  return (await db.query(CANDIDATE_ROWS_QUERY, [identity, destination, spkiDer])).rows;
}

/** Explains a CONNECT against a registry connection (for the command and for tests). */
export async function explainConnect(db: Pick<pg.ClientBase, 'query'>, input: ExplainInput): Promise<Explanation> {
  const { identity, destination, normalised } = preliminaryChecks(input);
  const asks = identity.status !== 'fail' && destination.status === 'pass' && normalised !== undefined;
  return explain(input, asks ? await candidateRows(db, input.identity, normalised, input.spkiDer) : undefined);
}

/** Exit 0 when the gateway would allow this CONNECT, 3 when it would deny it. */
export async function explainCommand(context: CommandContext, identity: string, destination: string, options: ExplainOptions): Promise<CommandResult> {
  const oid = checkOid(options.oid ?? DEFAULT_IDENTITY_OID);
  const subject = readSubjectKey(options, oid)!;
  if (subject.certificate?.status === 'valid' && subject.certificate.identity !== identity) {
    throw new UsageError(`the certificate carries identity ${JSON.stringify(subject.certificate.identity)}, not ${JSON.stringify(identity)}: the gateway would look up ${JSON.stringify(subject.certificate.identity)} (explain that, or use --spki)`);
  }
  const input: ExplainInput = { identity, destinationInput: destination, spkiDer: subject.spkiDer, oid, ...(subject.certificate ? { certificate: subject.certificate } : {}) };
  const { explanation, attestation } = await withRegistry(registryTarget(context), async (db) => ({
    explanation: await explainConnect(db, input),
    attestation: (await findKeyAttestations(db, [subject.spkiDer])).get(subject.spkiDer.toString('hex')),
  }));
  return {
    // The gateway does not look at attestation per CONNECT; it is shown for the operator.
    data: { ...explanation, subject_attestation: attestationSummary(attestation) },
    human: [...explanationLines(explanation), `agent key attestation: ${describeAttestation(attestation)}`],
    exitCode: explanation.verdict.decision === 'allow' ? EXIT.ok : EXIT.refused,
  };
}
