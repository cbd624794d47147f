import { Argument, Command, CommanderError, Option } from 'commander';
import type { CommandContext, CommandResult } from './context.js';
import {
  DEFAULT_IDENTITY_OID,
  EK_CA_VARIABLE,
  DEFAULT_TOKEN_LABEL,
  PRINCIPAL_KEY_ID_VARIABLE,
  SO_PIN_VARIABLE,
  TOKEN_LABEL_VARIABLE,
  USER_PIN_VARIABLE,
} from './environment.js';
import { EXIT, UsageError, type ExitCode } from './errors.js';
import { errorText, Output, type CliIo } from './output.js';

/**
 * The `agent-gateway-registry` command line: commander wiring only. Each subcommand lives in
 * commands/ and is loaded when it runs, so `migrate` never loads the TPM binding or X.509 code
 * (keep this module's imports light for the same reason).
 */

const GLOBAL_HELP = `
Environment:
  AGENT_GATEWAY_DATABASE_URL, DATABASE_URL   registry database (admin role), first one set wins;
                                             --database-url-env NAME reads another variable
  ${USER_PIN_VARIABLE.padEnd(42)} TPM token user PIN (or --user-pin-file FILE)
  ${SO_PIN_VARIABLE.padEnd(42)} TPM token SO PIN, to create the token (or --so-pin-file FILE)
  ${TOKEN_LABEL_VARIABLE.padEnd(42)} TPM token label (default ${DEFAULT_TOKEN_LABEL})
  ${PRINCIPAL_KEY_ID_VARIABLE.padEnd(42)} default for grant-permission --principal
  ${EK_CA_VARIABLE.padEnd(42)} EK CA bundle for attestation (or --ek-ca FILE)
  TPM2_PKCS11_TCTI, TPM2_PKCS11_STORE        how tpm2-pkcs11 reaches the TPM and where it keeps
                                             token metadata (read by tpm2-pkcs11 itself)

Exit codes:
  0  success (explain: the gateway would allow)
  1  runtime error: database, TPM, file system
  2  usage error: bad option, argument or value
  3  refused: the result would be denied by the gateway, or contradicts the registry,
     or a key id or identity argument is not valid UTF-8; nothing was written
     (explain: the gateway would deny)
  4  schema: database not migrated, another schema version, edited or out-of-order migration

PINs and database passwords are never accepted as argument values and never printed.`;

/** Commander collector for repeatable options such as `--grant DEST`. */
function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** `--user-pin=1234` is an unknown option whose value must not be echoed back. */
function scrubOptionValues(text: string): string {
  return text.replace(/(unknown option '--[^=' ]+=)[^']*'/g, "$1[redacted]'");
}

interface RunState {
  result?: CommandResult;
  /** `migrate`, `revoke scope`, ...: the `command` field of JSON output. */
  name?: string;
  /** The deepest command parsing reached: the one that lacked a subcommand when commander shows help as an error. */
  reached?: Command;
}

/** What a command that only groups subcommands (the program, `revoke`, `attest`) says when given none. */
function missingSubcommand(command: Command): string {
  const names = command.commands.map((sub) => sub.name()).filter((name) => name !== 'help').join(', ');
  if (!command.parent) return `no command given: use one of ${names} (see \`agent-gateway-registry --help\`)`;
  return `\`${command.name()}\` needs one of its commands: ${names} (see \`agent-gateway-registry ${command.name()} --help\`)`;
}

/**
 * Refuses an option given an empty value, as `--principal "$KEY"` with KEY unset gives: the
 * commands read an empty value as "not given", so a narrowing filter would silently widen
 * (`delete-permission --principal ""` revoked the identity's rows of every principal).
 */
function refuseEmptyOptions(command: Command): void {
  for (let at: Command | null = command; at; at = at.parent) {
    for (const option of at.options) {
      const value: unknown = at.getOptionValue(option.attributeName());
      if (value === '' || (Array.isArray(value) && value.includes(''))) throw new UsageError(`${option.long ?? option.flags} must not be empty`);
    }
  }
}

type Loader<A extends unknown[]> = (context: CommandContext, ...args: A) => Promise<CommandResult>;

function timeOptions(command: Command, what: string): Command {
  return command
    .option('--not-before <time>', `start of the ${what}'s validity, RFC 3339 (default: now, database clock)`)
    .option('--not-after <time>', `end of the ${what}'s validity, RFC 3339`);
}

function tokenOptions(command: Command): Command {
  return command
    .option('--token <label>', `TPM token label (default: $${TOKEN_LABEL_VARIABLE}, else ${DEFAULT_TOKEN_LABEL})`)
    .option('--user-pin-file <file>', `file holding the token's user PIN (default: $${USER_PIN_VARIABLE})`);
}

function subjectOptions(command: Command, required: boolean): Command {
  const suffix = required ? ' (one of --cert, --public-key, --spki is required)' : '';
  return command
    .option('--cert <pem-file>', `agent carrier certificate; its exact SubjectPublicKeyInfo is used${suffix}`)
    .option('--public-key <pem-file>', 'agent public key (PEM "PUBLIC KEY")')
    .option('--spki <hex>', 'agent SubjectPublicKeyInfo DER as hex');
}

export function buildProgram(io: CliIo, output: Output, state: RunState): Command {
  const program = new Command()
    .name('agent-gateway-registry')
    .description('Operate the signed authorization registry of agent-gateway: migrations, TPM-backed principal keys, delegations and signed agent permissions.')
    .option('--json', 'machine-readable output: one JSON document on stdout')
    .option('--database-url-env <name>', 'read the database URL from this environment variable')
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride()
    .configureOutput({
      writeOut: (text) => io.stdout.write(text),
      writeErr: (text) => io.stderr.write(errorText(scrubOptionValues(text))),
      // Every error the CLI prints starts the same way, commander's usage errors included.
      outputError: (text, write) => write(text.replace(/^error: /, 'agent-gateway-registry: error: ')),
    })
    .addHelpText('after', GLOBAL_HELP)
    .hook('preSubcommand', (_command, subcommand) => {
      state.reached = subcommand;
    });

  /** Wraps a subcommand: builds its context from the global options and keeps its result. */
  const run = <A extends unknown[]>(load: () => Promise<Loader<A>>) =>
    async (...args: unknown[]) => {
      const command = args.at(-1) as Command;
      refuseEmptyOptions(command);
      const globals = command.optsWithGlobals<{ json?: boolean; databaseUrlEnv?: string }>();
      output.json = Boolean(globals.json);
      const context: CommandContext = { env: io.env, output, databaseUrlEnv: globals.databaseUrlEnv };
      // commander passes (...arguments, options, command); handlers take (context, ...arguments, options).
      const handler = await load();
      const parent = command.parent && command.parent !== program ? `${command.parent.name()} ` : '';
      state.name = `${parent}${command.name()}`;
      state.result = await handler(context, ...(args.slice(0, -1) as A));
    };

  program
    .command('migrate')
    .description('apply migrations/NNNN_*.sql in order under an advisory lock, recording each file\'s SHA-256; a database migrated with plain psql is recognised and baselined')
    .option('--dir <dir>', 'migrations directory (default: the repository\'s migrations/)')
    .option('--dry-run', 'show what would be applied; write nothing')
    .action(run(async () => (await import('./commands/migrate.js')).migrate));

  tokenOptions(timeOptions(program.command('register-principal'), 'principal key'))
    .description('create (or reuse) a non-exportable P-256 key labelled KEY_ID in the TPM token and register only its public key')
    .argument('<key-id>', 'principal key id, e.g. org-alice (also the key label in the TPM, at most 32 bytes)')
    .option('--so-pin-file <file>', `file holding the token's SO PIN, needed to create the token (default: $${SO_PIN_VARIABLE})`)
    .option('--ek-ca <pem-file>', `CA certificates trusted to issue EK certificates: the key is attested against them (default: $${EK_CA_VARIABLE})`)
    .option('--allow-unattested', 'register the key without TPM attestation')
    .action(run(async () => (await import('./commands/register-principal.js')).registerPrincipal));

  subjectOptions(program.command('enrol-agent-key'), false)
    .description('prove with TPM evidence (EK certificate, credential activation, TPM2_Certify) that the agent key in this TPM token cannot leave it, and record the evidence so grant-permission accepts the key')
    .option('--token-label <label>', 'tpm2-pkcs11 token of the sidecar (default: $AGENT_GATEWAY_SIDECAR_TPM_TOKEN, else agent-gateway-sidecar)')
    .option('--key-label <label>', 'label of the sidecar\'s TLS key in that token (default: $AGENT_GATEWAY_SIDECAR_TPM_KEY, else agent-tls)')
    .option('--user-pin-file <file>', `file holding the token's user PIN (default: $${USER_PIN_VARIABLE})`)
    .option('--ek-ca <pem-file>', `CA certificates trusted to issue EK certificates (default: $${EK_CA_VARIABLE})`)
    .option('--oid <oid>', 'OID of the identity extension read from --cert', DEFAULT_IDENTITY_OID)
    .option('--proof <file>', 'finish an enrolment split across machines with the proof from `attest activate` (no TPM needed here)')
    .action(run(async () => (await import('./commands/enrol-agent-key.js')).enrolAgentKey));

  const attest = program.command('attest').description('enrol a key whose TPM the registry side cannot reach: collect (TPM) → challenge (registry) → activate (TPM) → enrol-agent-key --proof (registry)');
  attest
    .command('collect')
    .description('where the TPM is: write the evidence (EK certificate, a new attestation key, its certification of the sidecar key); no database needed')
    .requiredOption('--out <file>', 'evidence JSON to give to the registry side')
    .requiredOption('--state-dir <dir>', 'private directory keeping the EK and AK contexts until attest activate')
    .option('--token-label <label>', 'tpm2-pkcs11 token of the sidecar (default: $AGENT_GATEWAY_SIDECAR_TPM_TOKEN, else agent-gateway-sidecar)')
    .option('--key-label <label>', 'label of the sidecar\'s TLS key (default: $AGENT_GATEWAY_SIDECAR_TPM_KEY, else agent-tls)')
    .option('--user-pin-file <file>', `file holding the token's user PIN (default: $${USER_PIN_VARIABLE})`)
    .action(run(async () => (await import('./commands/attest.js')).attestCollect));
  subjectOptions(attest.command('challenge'), false)
    .description('registry side: verify the evidence against the EK CAs and write a single-use challenge only that TPM can answer')
    .requiredOption('--evidence <file>', 'evidence JSON from attest collect')
    .requiredOption('--out <file>', 'challenge JSON to give to the TPM side')
    .option('--ek-ca <pem-file>', `CA certificates trusted to issue EK certificates (default: $${EK_CA_VARIABLE})`)
    .option('--oid <oid>', 'OID of the identity extension read from --cert', DEFAULT_IDENTITY_OID)
    .action(run(async () => (await import('./commands/attest.js')).attestChallenge));
  attest
    .command('activate')
    .description('where the TPM is: answer the challenge with the attestation key from attest collect; no database needed')
    .requiredOption('--challenge <file>', 'challenge JSON from attest challenge')
    .requiredOption('--state-dir <dir>', 'the directory given to attest collect')
    .requiredOption('--out <file>', 'proof JSON (private, written 0600) for enrol-agent-key --proof')
    .action(run(async () => (await import('./commands/attest.js')).attestActivate));

  timeOptions(program.command('grant-scope'), 'delegation')
    .description('admin: allow principal KEY_ID to delegate these destinations (stored normalised: docstore -> docstore:443); re-granting reactivates')
    .argument('<key-id>', 'principal key id')
    .argument('<destinations...>', 'host[:port] destinations')
    .action(run(async () => (await import('./commands/grant-scope.js')).grantScope));

  subjectOptions(tokenOptions(timeOptions(program.command('grant-permission'), 'permission')), true)
    .description('sign, inside the principal\'s TPM, one permission row per destination for an agent identity and key (default validity: 30 days)')
    .argument('[destinations...]', 'host[:port] destinations (or --grant)')
    .option('--principal <key-id>', `signing principal key id (default: $${PRINCIPAL_KEY_ID_VARIABLE})`)
    .requiredOption('--identity <identity>', 'agent identity, as its certificate extension carries it')
    .option('--grant <destination>', 'destination to grant (repeatable)', collect)
    .option('--oid <oid>', 'OID of the identity extension checked in --cert', DEFAULT_IDENTITY_OID)
    .option('--allow-unattested', 'grant to an agent key that enrol-agent-key has not attested')
    .action(run(async () => (await import('./commands/grant-permission.js')).grantPermission));

  tokenOptions(timeOptions(program.command('rotate-key'), 'new permissions'))
    .description('key rotation: sign, for the agent\'s new key, a permission for every active or not-yet-valid one the principal signed for its old key (same destination and window unless given); all or nothing, old rows left for delete-permission')
    .requiredOption('--identity <identity>', 'agent identity')
    .requiredOption('--from-cert <pem-file>', 'carrier certificate of the old key')
    .requiredOption('--to-cert <pem-file>', 'carrier certificate of the new key (must carry --identity)')
    .option('--principal <key-id>', `signing principal key id (default: $${PRINCIPAL_KEY_ID_VARIABLE})`)
    .option('--oid <oid>', 'OID of the identity extension checked in --to-cert', DEFAULT_IDENTITY_OID)
    .option('--allow-unattested', 'rotate to a new key that enrol-agent-key has not attested')
    .action(run(async () => (await import('./commands/rotate-key.js')).rotateKey));

  subjectOptions(program.command('delete-permission'), false)
    .description('revoke the active (and not yet valid) permissions of an identity, narrowed by key, principal and destinations when given')
    .argument('[destinations...]', 'only these destinations')
    .requiredOption('--identity <identity>', 'agent identity')
    .option('--principal <key-id>', 'only permissions signed by this principal')
    .action(run(async () => (await import('./commands/delete-permission.js')).deletePermission));

  const revoke = program.command('revoke').description('revoke a principal key, a delegation or permissions by id (sets revoked_at; nothing is deleted)');
  revoke
    .command('principal')
    .description('revoke a principal key: everything it signed is denied from now on')
    .argument('<key-id>')
    .action(run(async () => (await import('./commands/revoke.js')).revokePrincipal));
  revoke
    .command('scope')
    .description('revoke delegations of a principal key')
    .argument('<key-id>')
    .argument('<destinations...>')
    .action(run(async () => (await import('./commands/revoke.js')).revokeScope));
  revoke
    .command('permission')
    .description('revoke permissions by permission id')
    .argument('<permission-ids...>')
    .action(run(async () => (await import('./commands/revoke.js')).revokePermissionIds));

  program
    .command('list')
    .description('list registry rows with their state in the database clock: active, not-yet-valid, expired, revoked')
    .addArgument(new Argument('[kind]', 'principals, scopes or permissions (default: all)').choices(['principals', 'scopes', 'permissions']))
    .option('--identity <identity>', 'only permissions of this identity')
    .option('--principal <key-id>', 'only rows of this principal key')
    .addOption(new Option('--state <state>', 'only rows in this state').choices(['active', 'not-yet-valid', 'expired', 'revoked']))
    .option('--expiring-within <duration>', 'only rows to renew: active or not yet valid, ending within this duration (30d, 12h, 1d12h, 90m, 2w), soonest first')
    .action(run(async () => (await import('./commands/list.js')).list));

  subjectOptions(program.command('explain'), true)
    .description('show, check by check, whether the gateway would allow IDENTITY with this key to CONNECT to DESTINATION, and why (exit 0 allow, 3 deny)')
    .argument('<identity>', 'agent identity')
    .argument('<destination>', 'CONNECT authority, host[:port]')
    .option('--oid <oid>', 'OID of the identity extension read from --cert', DEFAULT_IDENTITY_OID)
    .action(run(async () => (await import('./commands/explain.js')).explainCommand));

  program
    .command('audit')
    .description("read the gateway's audit trail (every CONNECT decision and tunnel close), newest first")
    .option('--identity <identity>', 'only this client identity')
    .option('--destination <host[:port]>', 'only this destination (normalised like the gateway does)')
    .option('--status <code>', 'only this HTTP status, e.g. 403')
    .option('--reason <code>', 'only this reason code, e.g. not_authorized or tunnel_closed')
    .option('--since <time>', 'rows at or after this RFC 3339 time (with a zone)')
    .option('--until <time>', 'rows before this RFC 3339 time (with a zone)')
    .option('--limit <n>', 'at most this many rows (default 100)')
    .action(run(async () => (await import('./commands/audit.js')).audit));

  return program;
}

/** Runs one command line; returns the exit code instead of exiting, so tests can call it in-process. */
export async function runCli(argv: readonly string[], io: CliIo): Promise<ExitCode> {
  // --json is looked at before parsing so that even a usage error is reported as JSON.
  const output = new Output(io, argv.includes('--json'));
  const state: RunState = {};
  const program = buildProgram(io, output, state);
  try {
    await program.parseAsync([...argv], { from: 'user' });
  } catch (error) {
    if (error instanceof CommanderError) {
      if (error.exitCode === 0 || error.code === 'commander.helpDisplayed' || error.code === 'commander.version') return EXIT.ok;
      // A command that only groups subcommands was given none: commander printed its help to stderr, and the error follows it.
      if (error.code === 'commander.help') return output.failure(new UsageError(missingSubcommand(state.reached ?? program)));
      return output.failure(new UsageError(scrubOptionValues(error.message).replace(/^error: /, '')), { printed: true });
    }
    return output.failure(error);
  }
  if (!state.result) {
    output.failure(new UsageError('no command given'), { printed: true });
    program.outputHelp({ error: true });
    return EXIT.usage;
  }
  output.result(state.name ?? '', state.result.data, state.result.human);
  return state.result.exitCode ?? EXIT.ok;
}
