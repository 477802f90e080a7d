using System.Buffers;
using System.Diagnostics;
using System.Text.Json;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Synthesis;

public sealed record SyntheticCheckpointOptions
{
    /// <summary>Stored dtype of every tensor: F32, BF16 (default, as the released checkpoints) or F16.</summary>
    public DType DType { get; init; } = DType.BF16;
    public ulong Seed { get; init; }
    /// <summary>Largest shard in bytes (decimal, as Hugging Face's max_shard_size); a tensor larger than this gets a shard of its own.</summary>
    public long MaxShardBytes { get; init; } = 2_000_000_000;
    /// <summary>A tokenizer.model to copy instead of writing a synthetic one.</summary>
    public string? TokenizerPath { get; init; }
    /// <summary>Replace the checkpoint files already in the output folder instead of failing.</summary>
    public bool Overwrite { get; init; }
    /// <summary>
    /// Write the quantized layout of <see cref="Quant.QuantizedCheckpoint"/> directly (one model.safetensors; Linear weights in
    /// this format, the embedding in q8, the rest in <see cref="DType"/>), quantizing each band of rows as it is drawn.
    /// Null (default): a float checkpoint.
    /// </summary>
    public Quant.QuantFormat? Quantization { get; init; }
}

/// <summary>Bytes of tensor data written so far out of the total.</summary>
public readonly record struct SynthesisProgress(long BytesWritten, long TotalBytes, TimeSpan Elapsed);

public sealed record SyntheticCheckpointResult(string Directory, IReadOnlyList<string> WeightFiles, int TensorCount, long TensorBytes, TimeSpan Elapsed);

/// <summary>
/// Writes a random-weight PaliGemma checkpoint in the Hugging Face hub layout: <c>config.json</c>, <c>tokenizer.model</c>
/// and the weights as <c>model.safetensors</c> or, when they exceed one shard, <c>model-0000N-of-0000M.safetensors</c>
/// with <c>model.safetensors.index.json</c>. Same config, options and seed give the same bytes.
/// </summary>
public static class SyntheticCheckpoint
{
    private const string ConfigFileName = "config.json";
    private const string TokenizerFileName = "tokenizer.model";

    /// <summary>
    /// Groups tensors into shards in order, as Hugging Face does: a new shard starts when the next tensor would push the
    /// current one past <paramref name="maxShardBytes"/>.
    /// </summary>
    public static List<List<SyntheticTensor>> Shard(IReadOnlyList<SyntheticTensor> tensors, DType dtype, long maxShardBytes)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxShardBytes);
        var shards = new List<List<SyntheticTensor>>();
        List<SyntheticTensor>? current = null;
        long currentBytes = 0;
        foreach (var tensor in tensors)
        {
            long bytes = tensor.ByteLength(dtype);
            if (current is null || (current.Count > 0 && currentBytes + bytes > maxShardBytes))
            {
                current = [];
                shards.Add(current);
                currentBytes = 0;
            }
            current.Add(tensor);
            currentBytes += bytes;
        }
        return shards;
    }

    /// <summary>File name of shard <paramref name="index"/> (0-based) of <paramref name="count"/>.</summary>
    public static string ShardFileName(int index, int count) =>
        count == 1 ? SafetensorsCheckpoint.SingleFileName : $"model-{index + 1:D5}-of-{count:D5}.safetensors";

    /// <summary>
    /// Writes the checkpoint for the config at <paramref name="configPath"/> (copied as is) into <paramref name="outputDirectory"/>.
    /// <paramref name="progress"/> is called after each block of tensor data is written.
    /// </summary>
    public static SyntheticCheckpointResult Write(string configPath, string outputDirectory, SyntheticCheckpointOptions options,
        Action<SynthesisProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(configPath);
        ArgumentException.ThrowIfNullOrEmpty(outputDirectory);
        ArgumentNullException.ThrowIfNull(options);
        if (options.DType is not (DType.F32 or DType.BF16 or DType.F16))
            throw new ArgumentException($"synthetic weights are F32, BF16 or F16, not {options.DType}", nameof(options));
        if (options.MaxShardBytes <= 0)
            throw new ArgumentException($"the shard size must be positive, got {options.MaxShardBytes}", nameof(options));

        var clock = Stopwatch.StartNew();
        if (!File.Exists(configPath)) throw new FileNotFoundException($"'{configPath}': config file not found", configPath);
        byte[] configJson = File.ReadAllBytes(configPath);
        var config = PaliGemmaConfig.Parse(configJson, configPath);

        byte[] tokenizerModel = options.TokenizerPath is { } tokenizerPath
            ? CheckedTokenizer(tokenizerPath, config)
            : SyntheticTokenizer.Build(config.Text.VocabSize, config.ImageTokenIndex);

        string directory = Path.GetFullPath(outputDirectory);
        Directory.CreateDirectory(directory);
        ClearOldCheckpoint(directory, options.Overwrite);

        var tensors = PaliGemmaTensorPlan.For(config);
        if (options.Quantization is { } format)
        {
            long quantizedTotal = QuantizedSynthesis.TotalBytes(tensors, format, options.DType);
            long done = 0;
            string single = Path.Combine(directory, SafetensorsCheckpoint.SingleFileName);
            QuantizedSynthesis.Write(tensors, single, format, options,
                bytes => progress?.Invoke(new SynthesisProgress(done += bytes, quantizedTotal, clock.Elapsed)), cancellationToken);
            File.WriteAllBytes(Path.Combine(directory, TokenizerFileName), tokenizerModel);
            File.WriteAllBytes(Path.Combine(directory, ConfigFileName), configJson);
            return new SyntheticCheckpointResult(directory, [single], tensors.Count, quantizedTotal, clock.Elapsed);
        }
        var shards = Shard(tensors, options.DType, options.MaxShardBytes);
        long totalBytes = tensors.Sum(t => t.ByteLength(options.DType));
        long written = 0;
        void OnWritten(long bytes)
        {
            long now = Interlocked.Add(ref written, bytes);
            progress?.Invoke(new SynthesisProgress(now, totalBytes, clock.Elapsed));
        }

        var files = new List<string>(shards.Count);
        var weightMap = new List<KeyValuePair<string, string>>(tensors.Count);
        for (int s = 0; s < shards.Count; s++)
        {
            string fileName = ShardFileName(s, shards.Count);
            var writer = new SafetensorsWriter(new Dictionary<string, string> { ["format"] = "pt" }) { AlignToCacheLines = true };
            foreach (var tensor in shards[s])
            {
                var t = tensor;
                writer.Add(t.Name, options.DType, t.Shape, stream =>
                    SyntheticTensorData.WriteTensor(stream, options.Seed, t, options.DType, OnWritten, cancellationToken));
                weightMap.Add(new(t.Name, fileName));
            }
            string path = Path.Combine(directory, fileName);
            writer.WriteTo(path);
            files.Add(path);
        }
        if (shards.Count > 1)
            File.WriteAllBytes(Path.Combine(directory, SafetensorsCheckpoint.IndexFileName), IndexJson(weightMap, totalBytes));

        File.WriteAllBytes(Path.Combine(directory, TokenizerFileName), tokenizerModel);
        // Last, so an interrupted run does not leave a folder that looks loadable.
        File.WriteAllBytes(Path.Combine(directory, ConfigFileName), configJson);
        return new SyntheticCheckpointResult(directory, files, tensors.Count, totalBytes, clock.Elapsed);
    }

    private static byte[] CheckedTokenizer(string path, PaliGemmaConfig config)
    {
        var tokenizer = Text.PaliGemmaTokenizer.Load(path);
        if (tokenizer.ImageTokenId != config.ImageTokenIndex)
            throw new InvalidDataException($"'{path}': <image> is id {tokenizer.ImageTokenId} but the config's image_token_index is {config.ImageTokenIndex}");
        if (tokenizer.PieceCount > config.Text.VocabSize)
            throw new InvalidDataException($"'{path}': {tokenizer.PieceCount} pieces do not fit text_config.vocab_size {config.Text.VocabSize}");
        return File.ReadAllBytes(path);
    }

    /// <summary>Removes the weight files of an earlier checkpoint (stale shards would be picked up), or refuses to.</summary>
    private static void ClearOldCheckpoint(string directory, bool overwrite)
    {
        var existing = Directory.EnumerateFiles(directory)
            .Where(static f =>
            {
                string name = Path.GetFileName(f);
                return name is ConfigFileName or TokenizerFileName or SafetensorsCheckpoint.SingleFileName or SafetensorsCheckpoint.IndexFileName
                    || (name.StartsWith("model-", StringComparison.Ordinal) && name.EndsWith(".safetensors", StringComparison.Ordinal));
            })
            .Order(StringComparer.Ordinal)
            .ToArray();
        if (existing.Length == 0) return;
        if (!overwrite)
            throw new IOException($"'{directory}' already holds checkpoint files ({string.Join(", ", existing.Select(Path.GetFileName))}); choose an empty folder or overwrite");
        foreach (string file in existing) File.Delete(file);
    }

    private static byte[] IndexJson(List<KeyValuePair<string, string>> weightMap, long totalBytes)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var json = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true, NewLine = "\n" }))
        {
            json.WriteStartObject();
            json.WriteStartObject("metadata");
            json.WriteNumber("total_size", totalBytes);
            json.WriteEndObject();
            json.WriteStartObject("weight_map");
            foreach (var (name, file) in weightMap.OrderBy(static p => p.Key, StringComparer.Ordinal)) json.WriteString(name, file);
            json.WriteEndObject();
            json.WriteEndObject();
        }
        buffer.Write("\n"u8);
        return buffer.WrittenSpan.ToArray();
    }
}
