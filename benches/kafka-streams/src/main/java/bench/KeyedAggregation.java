package bench;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.KTable;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.kstream.Produced;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The processor bench's keyed aggregation on Kafka Streams: per key {count, sum, min, max, chain} of
 * decimal amounts, in the default RocksDB store, published as JSON to the output topic.
 *
 * <p>Usage: {@code KeyedAggregation BOOTSTRAP INPUT OUTPUT GUARANTEE STATE_DIR APP_ID THREADS}. Prints
 * {@code AT n NANOS CPU_NANOS} every 10 ms (records aggregated so far, a monotonic clock, the process's
 * CPU time) until stdin closes, then closes the streams and exits.
 */
public final class KeyedAggregation {
    static final long MULTIPLIER = 1_099_511_628_211L;

    /** The aggregate: 5 longs. */
    static final class Agg {
        long count, sum, min, max, chain;

        Agg with(long amount) {
            Agg next = new Agg();
            boolean first = count == 0;
            next.count = count + 1;
            next.sum = sum + amount;
            next.min = first ? amount : Math.min(min, amount);
            next.max = first ? amount : Math.max(max, amount);
            next.chain = chain * MULTIPLIER + amount;
            return next;
        }

        String json() {
            return "{\"count\":" + count + ",\"sum\":" + sum + ",\"min\":" + min + ",\"max\":" + max
                    + ",\"chain\":" + Long.toUnsignedString(chain) + "}";
        }
    }

    /** Fixed-width little-endian, as the Rust processor stores it. */
    static final class AggSerde implements Serde<Agg> {
        public Serializer<Agg> serializer() {
            return (topic, agg) -> {
                ByteBuffer b = ByteBuffer.allocate(40).order(ByteOrder.LITTLE_ENDIAN);
                b.putLong(agg.count).putLong(agg.sum).putLong(agg.min).putLong(agg.max).putLong(agg.chain);
                return b.array();
            };
        }

        public Deserializer<Agg> deserializer() {
            return (topic, bytes) -> {
                if (bytes == null) {
                    return null;
                }
                ByteBuffer b = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
                Agg agg = new Agg();
                agg.count = b.getLong();
                agg.sum = b.getLong();
                agg.min = b.getLong();
                agg.max = b.getLong();
                agg.chain = b.getLong();
                return agg;
            };
        }
    }

    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], input = args[1], output = args[2], guarantee = args[3];
        String stateDir = args[4], appId = args[5];
        int threads = Integer.parseInt(args[6]);

        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, guarantee);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
        props.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        props.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);
        // The same commit interval as the Rust processor's (Kafka Streams' own default is 30 s with
        // at_least_once, 100 ms with exactly_once_v2): outputs flush from the record cache on commit.
        props.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, 100);
        props.put("consumer.auto.offset.reset", "earliest");

        AtomicLong seen = new AtomicLong();
        StreamsBuilder builder = new StreamsBuilder();
        KTable<String, Agg> table = builder
                .stream(input, Consumed.with(Serdes.String(), Serdes.String()))
                .groupByKey()
                .aggregate(Agg::new, (key, value, agg) -> {
                    seen.incrementAndGet();
                    return agg.with(Long.parseLong(value.trim()));
                }, Materialized.<String, Agg, KeyValueStore<Bytes, byte[]>>as("aggregates")
                        .withKeySerde(Serdes.String())
                        .withValueSerde(new AggSerde()));
        if (!output.equals("-")) {
            table.toStream()
                    .mapValues(Agg::json)
                    .to(output, Produced.with(Serdes.String(), Serdes.String()));
        }

        KafkaStreams streams = new KafkaStreams(builder.build(), props);
        streams.start();
        com.sun.management.OperatingSystemMXBean os = (com.sun.management.OperatingSystemMXBean)
                java.lang.management.ManagementFactory.getOperatingSystemMXBean();
        Thread progress = new Thread(() -> {
            try {
                while (true) {
                    long count = seen.get();
                    System.out.println("AT " + count + " " + System.nanoTime() + " " + os.getProcessCpuTime());
                    System.out.flush();
                    Thread.sleep(10);
                }
            } catch (InterruptedException e) {
                // stopping
            }
        });
        progress.setDaemon(true);
        progress.start();
        BufferedReader stdin = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        while (stdin.readLine() != null) {
            // wait for the bench to close stdin
        }
        progress.interrupt();
        streams.close(Duration.ofSeconds(60));
    }
}
