package dev.tokenwire.polyglot;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.protobuf.Any;
import com.google.protobuf.ByteString;
import com.google.protobuf.CodedOutputStream;
import com.google.protobuf.Duration;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.ListValue;
import com.google.protobuf.NullValue;
import com.google.protobuf.Struct;
import com.google.protobuf.Value;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.ResourceInfo;
import dev.tokenwire.v1.CancelRequest;
import dev.tokenwire.v1.ChatRequest;
import dev.tokenwire.v1.GenerateRequest;
import dev.tokenwire.v1.GenerationServiceGrpc;
import dev.tokenwire.v1.GenerationServiceGrpc.GenerationServiceBlockingStub;
import dev.tokenwire.v1.ListModelsRequest;
import dev.tokenwire.v1.Message;
import dev.tokenwire.v1.Model;
import dev.tokenwire.v1.Options;
import dev.tokenwire.v1.ResumeRequest;
import dev.tokenwire.v1.Resumable;
import dev.tokenwire.v1.Role;
import dev.tokenwire.v1.StartRequest;
import dev.tokenwire.v1.Think;
import dev.tokenwire.v1.Token;
import io.grpc.ConnectivityState;
import io.grpc.Context;
import io.grpc.EquivalentAddressGroup;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.NameResolver;
import io.grpc.NameResolverProvider;
import io.grpc.NameResolverRegistry;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.health.v1.HealthCheckRequest;
import io.grpc.health.v1.HealthGrpc;
import io.grpc.protobuf.StatusProto;
import io.grpc.stub.MetadataUtils;
import java.io.ByteArrayOutputStream;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.net.InetSocketAddress;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;

/**
 * Calls tokenwire with grpc-java stubs generated from protos/ at build time, running the
 * scenarios listed in ../scenarios.json.
 *
 * <pre>
 *   java -jar target/polyglot-java.jar &lt;host:port&gt; &lt;scenario&gt;   one JSON line on stdout
 *   java -jar target/polyglot-java.jar golden                   hex of the golden GenerateRequest
 * </pre>
 */
public final class Client {
  private static final Gson GSON = new GsonBuilder().disableHtmlEscaping().serializeNulls().create();
  // UTF-8 whatever the locale (Java 17's default charset follows it).
  private static final PrintStream OUT =
      new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
  private static final PrintStream ERR =
      new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8);

  /** One scenario: the status it expects and what it does. */
  private record Scenario(Status.Code expect, Runner run) {}

  @FunctionalInterface
  private interface Runner {
    void run(ManagedChannel channel, Map<String, Object> report);
  }

  private static final Map<String, Scenario> SCENARIOS = Map.ofEntries(
      Map.entry("generate_stream", new Scenario(Status.Code.OK, Client::generateStream)),
      Map.entry("chat_history", new Scenario(Status.Code.OK, Client::chatHistory)),
      Map.entry("cancel_after_2", new Scenario(Status.Code.CANCELLED, Client::cancelAfter2)),
      Map.entry("deadline", new Scenario(Status.Code.DEADLINE_EXCEEDED, Client::deadline)),
      Map.entry("not_found", new Scenario(Status.Code.NOT_FOUND, Client::notFound)),
      Map.entry("invalid_argument",
          new Scenario(Status.Code.INVALID_ARGUMENT, Client::invalidArgument)),
      Map.entry("health", new Scenario(Status.Code.OK, Client::health)),
      Map.entry("list_models", new Scenario(Status.Code.OK, Client::listModels)),
      Map.entry("resume_after_drop", new Scenario(Status.Code.OK, Client::resumeAfterDrop)),
      Map.entry("start_and_cancel", new Scenario(Status.Code.OK, Client::startAndCancel)),
      Map.entry("retry_replicas", new Scenario(Status.Code.OK, Client::retryReplicas)));

  private Client() {}

  public static void main(String[] args) throws Exception {
    if (args.length == 1 && args[0].equals("golden")) {
      OUT.println(HexFormat.of().formatHex(deterministicBytes(goldenRequest())));
      return;
    }
    if (args.length != 2) {
      ERR.println("usage: polyglot-java <host:port> <scenario> | polyglot-java golden");
      System.exit(2);
    }
    Scenario scenario = SCENARIOS.get(args[1]);
    if (scenario == null) {
      ERR.println("polyglot-java: unknown scenario \"" + args[1] + "\"");
      System.exit(1);
    }
    ManagedChannel channel = channel(args[0]);
    Map<String, Object> report = new LinkedHashMap<>();
    report.put("scenario", args[1]);
    report.put("lang", "java");
    Status.Code code = Status.Code.OK;
    try {
      scenario.run().run(channel, report);
    } catch (StatusRuntimeException e) {
      code = e.getStatus().getCode();
    }
    report.put("code", code.name());
    report.put("ok", code == scenario.expect());
    OUT.println(GSON.toJson(report));
    if ("1".equals(System.getenv("TOKENWIRE_POLYGLOT_HOLD"))) {
      InputStream in = System.in; // keep the channel open until stdin closes
      while (in.read() != -1) {
        // discard
      }
    }
    channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
  }

  /**
   * The channel to the target; with TOKENWIRE_SERVICE_CONFIG (a file), it uses that service
   * config, the one the Python client applies by default.
   */
  @SuppressWarnings("unchecked")
  private static ManagedChannel channel(String target) throws IOException {
    if (target.startsWith("ipv4:")) {
      NameResolverRegistry.getDefaultRegistry().register(new AddressList());
    }
    ManagedChannelBuilder<?> builder =
        Grpc.newChannelBuilder(target, InsecureChannelCredentials.create());
    String file = System.getenv("TOKENWIRE_SERVICE_CONFIG");
    if (file != null && !file.isEmpty()) {
      // Gson reads JSON numbers as Double, the type grpc-java's service config wants.
      Map<String, ?> config = GSON.fromJson(Files.readString(Path.of(file)), Map.class);
      builder.defaultServiceConfig(config).enableRetry();
    }
    return builder.build();
  }

  /**
   * Resolves ipv4:ADDR,ADDR... targets, a list of replicas, to their addresses (gRPC core and
   * grpc-js do it themselves; grpc-java has no resolver for them).
   */
  private static final class AddressList extends NameResolverProvider {
    @Override
    public String getDefaultScheme() {
      return "ipv4";
    }

    @Override
    protected boolean isAvailable() {
      return true;
    }

    @Override
    protected int priority() {
      return 3; // below DNS (5), so that DNS stays the default scheme
    }

    @Override
    public NameResolver newNameResolver(URI target, NameResolver.Args args) {
      if (!"ipv4".equals(target.getScheme())) {
        return null;
      }
      List<EquivalentAddressGroup> groups = new ArrayList<>();
      for (String address : target.getSchemeSpecificPart().split(",")) {
        int colon = address.lastIndexOf(':');
        groups.add(new EquivalentAddressGroup(new InetSocketAddress(
            address.substring(0, colon), Integer.parseInt(address.substring(colon + 1)))));
      }
      return new NameResolver() {
        @Override
        public String getServiceAuthority() {
          return "tokenwire";
        }

        @Override
        public void start(Listener2 listener) {
          listener.onResult(ResolutionResult.newBuilder().setAddresses(groups).build());
        }

        @Override
        public void shutdown() {}
      };
    }
  }

  /**
   * The target lists a replica that cannot reach its engine and good ones; the service config
   * retries what failed before a token, so each call succeeds.
   */
  private static void retryReplicas(ManagedChannel channel, Map<String, Object> report) {
    List<String> texts = new ArrayList<>();
    report.put("texts", texts);
    try {
      for (int i = 0; i < 4; i++) {
        StringBuilder text = new StringBuilder();
        stub(channel).generate(GenerateRequest.newBuilder()
            .setModel("tiny").setPrompt("Why is the sky blue?").build())
            .forEachRemaining(token -> text.append(token.getText()));
        texts.add(text.toString());
      }
    } finally {
      report.put("calls_ok", texts.size());
    }
  }

  private static GenerationServiceBlockingStub stub(ManagedChannel channel) {
    return GenerationServiceGrpc.newBlockingStub(channel).withDeadlineAfter(30, TimeUnit.SECONDS);
  }

  /** Reads a token stream, printing tokens as they arrive; stopAfter > 0 calls stop then. */
  private static void consume(Iterator<Token> stream, long started, Map<String, Object> report,
      int stopAfter, Runnable stop) {
    int count = 0;
    StringBuilder text = new StringBuilder();
    try {
      while (stream.hasNext()) {
        Token token = stream.next();
        double ms = (System.nanoTime() - started) / 1e6;
        ERR.printf("[%8.1f ms] %s%n", ms, GSON.toJson(token.getText()));
        if (count == 0) {
          report.put("first_ms", ms);
        }
        report.put("last_ms", ms);
        count++;
        text.append(token.getText());
        putFinal(token, report);
        if (stopAfter > 0 && count == stopAfter) {
          stop.run();
        }
      }
    } finally {
      report.put("tokens", count);
      report.put("text", text.toString());
    }
  }

  /** Copies the fields of the final Token (done) into the report. */
  private static void putFinal(Token token, Map<String, Object> report) {
    if (token.getDone()) {
      report.put("finish_reason", token.getFinishReason().name());
      report.put("completion_tokens", token.getUsage().getCompletionTokens());
      report.put("model", token.getModel());
    }
  }

  private static final Metadata.Key<String> REQUEST_ID =
      Metadata.Key.of("x-request-id", Metadata.ASCII_STRING_MARSHALLER);

  /** The x-request-id value in metadata, or "" when there is none. */
  private static String requestId(Metadata metadata) {
    String value = metadata == null ? null : metadata.get(REQUEST_ID);
    return value == null ? "" : value;
  }

  private static void generateStream(ManagedChannel channel, Map<String, Object> report) {
    AtomicReference<Metadata> headers = new AtomicReference<>();
    AtomicReference<Metadata> trailers = new AtomicReference<>();
    long started = System.nanoTime();
    consume(stub(channel)
        .withInterceptors(MetadataUtils.newCaptureMetadataInterceptor(headers, trailers))
        .generate(GenerateRequest.newBuilder()
            .setModel("tiny").setPrompt("Why is the sky blue?").build()), started, report, 0, null);
    report.put("request_id_header", requestId(headers.get()));
    report.put("request_id_trailer", requestId(trailers.get()));
  }

  private static Message message(Role role, String content) {
    return Message.newBuilder().setRole(role).setContent(content).build();
  }

  private static void chatHistory(ManagedChannel channel, Map<String, Object> report) {
    long started = System.nanoTime();
    ChatRequest request = ChatRequest.newBuilder()
        .setModel("tiny")
        .addMessages(message(Role.ROLE_SYSTEM, "You answer in one short sentence."))
        .addMessages(message(Role.ROLE_USER, "Name a primary colour."))
        .addMessages(message(Role.ROLE_ASSISTANT, "Red."))
        .addMessages(message(Role.ROLE_USER, "Another one?"))
        .build();
    consume(stub(channel).chat(request), started, report, 0, null);
  }

  private static void cancelAfter2(ManagedChannel channel, Map<String, Object> report) {
    // A blocking stream is cancelled through its Context.
    try (Context.CancellableContext context = Context.current().withCancellation()) {
      context.run(() -> {
        long started = System.nanoTime();
        Iterator<Token> stream = stub(channel).generate(GenerateRequest.newBuilder()
            .setModel("tiny").setPrompt("Tell me a long story.").build());
        consume(stream, started, report, 2, () -> context.cancel(null));
      });
    }
  }

  /** Connects and waits until the channel is ready (or 30 s have passed). */
  private static void awaitReady(ManagedChannel channel) {
    long giveUp = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
    ConnectivityState state = channel.getState(true);
    while (state != ConnectivityState.READY && System.nanoTime() < giveUp) {
      CountDownLatch changed = new CountDownLatch(1);
      channel.notifyWhenStateChanged(state, changed::countDown);
      try {
        changed.await(1, TimeUnit.SECONDS);
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        return;
      }
      state = channel.getState(true);
    }
  }

  private static void deadline(ManagedChannel channel, Map<String, Object> report) {
    // connect first, so that the deadline measures the call, not the connection set-up
    awaitReady(channel);
    long started = System.nanoTime();
    try {
      Iterator<Token> stream = GenerationServiceGrpc.newBlockingStub(channel)
          .withDeadlineAfter(800, TimeUnit.MILLISECONDS)
          .generate(GenerateRequest.newBuilder()
              .setModel("tiny").setPrompt("Tell me a long story.").build());
      consume(stream, started, report, 0, null);
    } finally {
      report.put("elapsed_ms", (System.nanoTime() - started) / 1_000_000);
    }
  }

  /** Copies the status message and the google.rpc details we look at into the report. */
  private static void richError(StatusRuntimeException e, Map<String, Object> report) {
    report.put("message", e.getStatus().getDescription());
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    if (status == null) {
      return;
    }
    try {
      for (Any detail : status.getDetailsList()) {
        if (detail.is(ErrorInfo.class)) {
          ErrorInfo info = detail.unpack(ErrorInfo.class);
          report.put("reason", info.getReason());
          report.put("domain", info.getDomain());
        } else if (detail.is(ResourceInfo.class)) {
          ResourceInfo info = detail.unpack(ResourceInfo.class);
          report.put("resource_type", info.getResourceType());
          report.put("resource_name", info.getResourceName());
        } else if (detail.is(BadRequest.class)) {
          List<String> fields = new ArrayList<>();
          List<String> descriptions = new ArrayList<>();
          for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class)
              .getFieldViolationsList()) {
            fields.add(v.getField());
            descriptions.add(v.getDescription());
          }
          report.put("fields", fields);
          report.put("descriptions", descriptions);
        }
      }
    } catch (InvalidProtocolBufferException bad) {
      throw new IllegalStateException("undecodable status detail", bad);
    }
  }

  private static void drain(GenerationServiceBlockingStub stub, GenerateRequest request,
      Map<String, Object> report) {
    try {
      stub.generate(request).forEachRemaining(token -> { });
    } catch (StatusRuntimeException e) {
      report.put("request_id_trailer", requestId(e.getTrailers()));
      richError(e, report);
      throw e;
    }
  }

  private static void notFound(ManagedChannel channel, Map<String, Object> report) {
    Metadata sent = new Metadata();
    sent.put(REQUEST_ID, "polyglot-java");
    drain(stub(channel).withInterceptors(MetadataUtils.newAttachHeadersInterceptor(sent)),
        GenerateRequest.newBuilder().setModel("nope").setPrompt("p").build(), report);
  }

  private static void invalidArgument(ManagedChannel channel, Map<String, Object> report) {
    drain(stub(channel), GenerateRequest.newBuilder()
        .setModel("").setPrompt("p").setOptions(Options.newBuilder().setTopP(2)).build(), report);
  }

  private static void health(ManagedChannel channel, Map<String, Object> report) {
    report.put("status", HealthGrpc.newBlockingStub(channel)
        .withDeadlineAfter(30, TimeUnit.SECONDS)
        .check(HealthCheckRequest.newBuilder().setService("").build())
        .getStatus().name());
  }

  private static void listModels(ManagedChannel channel, Map<String, Object> report) {
    List<String> names = new ArrayList<>();
    List<String> formats = new ArrayList<>();
    for (Model model : stub(channel).listModels(ListModelsRequest.getDefaultInstance())
        .getModelsList()) {
      names.add(model.getName());
      formats.add(model.getFormat());
    }
    report.put("models", names);
    report.put("formats", formats);
  }

  /**
   * Reads a resumable stream across calls: its id (the first message carries only that), how
   * many chunks it has received (position + chunk_count of the last Token: what Resume's after
   * takes), and whether every Token began where the one before it ended.
   */
  private static final class Follower {
    private final long started = System.nanoTime();
    String streamId = "";
    long next;
    boolean contiguous = true;

    /**
     * Reads up to limit content messages (0: to the end), printing each one's position and chunk
     * count (never its text); returns their text. Stopping early leaves the call running.
     */
    String read(Iterator<Token> stream, Map<String, Object> report, int limit) {
      StringBuilder text = new StringBuilder();
      int count = 0;
      while ((limit == 0 || count < limit) && stream.hasNext()) {
        Token token = stream.next();
        ERR.printf("[%8.1f ms] position %d, %d chunk(s)%n", (System.nanoTime() - started) / 1e6,
            token.getPosition(), token.getChunkCount());
        contiguous = contiguous && token.getPosition() == next;
        next = token.getPosition() + Integer.toUnsignedLong(token.getChunkCount());
        if (!token.getStreamId().isEmpty()) {
          streamId = token.getStreamId();
          continue;
        }
        count++;
        text.append(token.getText());
        putFinal(token, report);
      }
      return text.toString();
    }
  }

  private static void resumeAfterDrop(ManagedChannel channel, Map<String, Object> report) {
    Follower follower = new Follower();
    try {
      // A blocking stream is cancelled through its Context.
      try (Context.CancellableContext call = Context.current().withCancellation()) {
        call.run(() -> report.put("text_before", follower.read(stub(channel).generate(
            GenerateRequest.newBuilder().setModel("tiny").setPrompt("Tell me a long story.")
                .setResumable(Resumable.getDefaultInstance()).build()), report, 3)));
        report.put("stream_id", follower.streamId);
        report.put("after", follower.next);
        if (follower.streamId.isEmpty()) {
          throw new IllegalStateException(
              "the first message of a resumable stream carried no stream_id");
        }
        // Drop the call: cancel it and close its channel. The server detaches; the model goes on.
        call.cancel(null);
      }
      channel.shutdownNow();
      // The channel's authority is the host:port it was made for.
      ManagedChannel again =
          Grpc.newChannelBuilder(channel.authority(), InsecureChannelCredentials.create()).build();
      try {
        report.put("text_after", follower.read(stub(again).resume(ResumeRequest.newBuilder()
            .setStreamId(follower.streamId).setAfter(follower.next).build()), report, 0));
      } finally {
        again.shutdownNow();
      }
    } finally {
      report.put("positions_contiguous", follower.contiguous);
      report.put("chunks", follower.next);
    }
  }

  /** Reads Resume(streamId) from the start to its end: the status it ended with. */
  private static Status.Code resumeToEnd(GenerationServiceBlockingStub stub, String streamId) {
    try {
      stub.resume(ResumeRequest.newBuilder().setStreamId(streamId).build())
          .forEachRemaining(token -> { });
      return Status.Code.OK;
    } catch (StatusRuntimeException e) {
      return e.getStatus().getCode();
    }
  }

  private static void startAndCancel(ManagedChannel channel, Map<String, Object> report) {
    GenerationServiceBlockingStub stub = stub(channel);
    String streamId = stub.start(StartRequest.newBuilder().setGenerate(GenerateRequest.newBuilder()
        .setModel("tiny").setPrompt("Tell me a long story.")).build()).getStreamId();
    CancelRequest cancel = CancelRequest.newBuilder().setStreamId(streamId).build();
    report.put("stream_id", streamId);
    report.put("stopped", stub.cancel(cancel).getStopped());
    report.put("resume_code", resumeToEnd(stub, streamId).name());
    report.put("stopped_again", stub.cancel(cancel).getStopped());
    report.put("unknown_code", resumeToEnd(stub, "A".repeat(24)).name());
  }

  /** The encoding with map entries sorted by key, as the golden test compares it. */
  private static byte[] deterministicBytes(com.google.protobuf.Message message)
      throws IOException {
    ByteArrayOutputStream bytes = new ByteArrayOutputStream();
    CodedOutputStream out = CodedOutputStream.newInstance(bytes);
    out.useDeterministicSerialization();
    message.writeTo(out);
    out.flush();
    return bytes.toByteArray();
  }

  private static Value string(String s) {
    return Value.newBuilder().setStringValue(s).build();
  }

  /** ../golden_request.json, built with the generated builders. */
  static GenerateRequest goldenRequest() {
    Value answerEnum = Value.newBuilder().setListValue(ListValue.newBuilder()
        .addValues(string("yes"))
        .addValues(string("no"))
        .addValues(Value.newBuilder().setNumberValue(42.5))
        .addValues(Value.newBuilder().setBoolValue(true))
        .addValues(Value.newBuilder().setNullValue(NullValue.NULL_VALUE))).build();
    Struct schema = Struct.newBuilder().putFields("properties",
        Value.newBuilder().setStructValue(Struct.newBuilder().putFields("answer",
            Value.newBuilder().setStructValue(Struct.newBuilder()
                .putFields("enum", answerEnum)).build())).build()).build();
    return GenerateRequest.newBuilder()
        .setModel("smollm2:135m")
        .setPrompt("Why is the sky blue? Réponds en une ligne ✨")
        .setSystem("Answer in one line.")
        .setOptions(Options.newBuilder()
            .setTemperature(0) // explicit zero: present on the wire
            .setTopP(0.9)
            .setTopK(40)
            .setMaxTokens(-1)
            .addStop("\n\n")
            .addStop("User:")
            .setSeed(-42)
            .setRepeatPenalty(1.1)
            .setPresencePenalty(-0.5)
            .setNumCtx(8192))
        .setFormat(dev.tokenwire.v1.Format.newBuilder().setJsonSchema(schema))
        .setKeepAlive(Duration.newBuilder().setSeconds(90).setNanos(500_000_000))
        .addImages(ByteString.copyFrom(new byte[] {
            (byte) 0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a, 0x00, (byte) 0xff}))
        .setThink(Think.THINK_LOW)
        .setSuffix("")
        .setRaw(false)
        .build();
  }
}
