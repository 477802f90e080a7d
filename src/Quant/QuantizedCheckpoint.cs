using System.Globalization;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// How quantized matrices are stored in safetensors. A weight <c>W</c> of shape [N, K] becomes two tensors:
/// q8: <c>W.q8</c> I8 [N, blocks·32] and <c>W.q8_scales</c> F16 [N, blocks] (blocks = ceil(K / 32));
/// nf4: <c>W.nf4</c> U8 [N, blocks·32] and <c>W.nf4_absmax</c> F16 [N, blocks] (blocks = ceil(K / 64)).
/// A scale tensor is F32 instead when one of its blocks' scales does not fit fp16 (<see cref="Quantizer.ScaleFits"/>),
/// and in checkpoints of layout <see cref="LayoutVersionFp32"/>, written before fp16 scales (all F32); the loader reads
/// the scale dtype from the tensor.
/// Every file of a quantized checkpoint carries the metadata <see cref="FormatKey"/> (the format of the Linear layers),
/// <see cref="EmbeddingFormatKey"/> (always q8) and <see cref="LayoutKey"/>; the loader checks them and every shape.
/// </summary>
public static class QuantizedCheckpoint
{
    public const string FormatKey = "paligemma.quantization";
    public const string EmbeddingFormatKey = "paligemma.quantization.embedding";
    public const string LayoutKey = "paligemma.quantization.layout";
    /// <summary>Version tag of the block layouts documented on <see cref="QuantizedMatrix"/>: F16 scales (F32 for a tensor whose scales do not fit fp16).</summary>
    public const string LayoutVersion = "rows-of-blocks-v2";
    /// <summary>The same block layout with F32 scales only, as written before fp16 scales; still read.</summary>
    public const string LayoutVersionFp32 = "rows-of-blocks-v1";

    private static bool IsKnownLayout(string? layout) => layout is LayoutVersion or LayoutVersionFp32;

    /// <summary>Name of the packed-code tensor of <paramref name="weightName"/>.</summary>
    public static string CodesName(string weightName, QuantFormat format) => weightName + (format == QuantFormat.Q8 ? ".q8" : ".nf4");

    /// <summary>Name of the per-block scale tensor of <paramref name="weightName"/>.</summary>
    public static string ScalesName(string weightName, QuantFormat format) => weightName + (format == QuantFormat.Q8 ? ".q8_scales" : ".nf4_absmax");

    /// <summary>The metadata every file of a checkpoint quantized to <paramref name="format"/> carries.</summary>
    public static Dictionary<string, string> Metadata(QuantFormat format) => new(StringComparer.Ordinal)
    {
        ["format"] = "pt",
        [FormatKey] = format.Name(),
        [EmbeddingFormatKey] = QuantFormat.Q8.Name(),
        [LayoutKey] = LayoutVersion,
        ["paligemma.quantization.q8_block"] = QuantFormat.Q8.BlockSize().ToString(CultureInfo.InvariantCulture),
        ["paligemma.quantization.nf4_block"] = QuantFormat.Nf4.BlockSize().ToString(CultureInfo.InvariantCulture),
    };

    /// <summary>The Linear-layer format a checkpoint was quantized to (from its metadata), or null for a float checkpoint.</summary>
    public static QuantFormat? FormatOf(SafetensorsCheckpoint checkpoint)
    {
        QuantFormat? found = null;
        foreach (var file in checkpoint.Files)
        {
            file.Metadata.TryGetValue(FormatKey, out string? name);
            QuantFormat? format = name is null ? null : QuantFormats.Parse(name)
                ?? throw new InvalidDataException($"'{file.Path}': metadata {FormatKey} = '{name}' is not a known format (q8, nf4)");
            if (format is { } f)
            {
                if (found is { } other && other != f)
                    throw new InvalidDataException($"'{checkpoint.Directory}': files disagree on {FormatKey} ({other.Name()} and {f.Name()})");
                if (!file.Metadata.TryGetValue(LayoutKey, out string? layout) || !IsKnownLayout(layout))
                    throw new InvalidDataException($"'{file.Path}': metadata {LayoutKey} is '{layout}' but this build reads '{LayoutVersion}' and '{LayoutVersionFp32}'");
                found = f;
            }
        }
        return found;
    }

    /// <summary>
    /// Views the quantized form of <paramref name="weightName"/> (logical shape [rows, cols]) in a mapped checkpoint.
    /// Returns null when the checkpoint holds neither form of it; throws, naming the tensor, when the stored form is
    /// inconsistent (wrong dtype, row count or block count, or a file without the quantization metadata).
    /// </summary>
    public static unsafe QuantizedMatrix? TryOpen(SafetensorsCheckpoint checkpoint, string weightName, int rows, int cols)
    {
        foreach (QuantFormat format in (ReadOnlySpan<QuantFormat>)[QuantFormat.Q8, QuantFormat.Nf4])
        {
            string codesName = CodesName(weightName, format);
            if (!checkpoint.TryGet(codesName, out var codes))
                continue;
            string layout = CheckMetadata(checkpoint, codesName, format, weightName);
            string scalesName = ScalesName(weightName, format);
            if (!checkpoint.TryGet(scalesName, out var scales))
                throw new InvalidDataException($"'{checkpoint.Directory}': tensor '{codesName}' has no scale tensor '{scalesName}'");
            int blocks = format.BlocksPerRow(cols);
            var expectedDType = format == QuantFormat.Q8 ? DType.I8 : DType.U8;
            if (codes.DType != expectedDType)
                throw new InvalidDataException($"'{checkpoint.Directory}': tensor '{codesName}' has dtype {codes.DType.ToHeaderName()}; {format.Name()} codes are {expectedDType.ToHeaderName()}");
            bool fp32Only = layout == LayoutVersionFp32;
            if (scales.DType != DType.F32 && (fp32Only || scales.DType != DType.F16))
                throw new InvalidDataException($"'{checkpoint.Directory}': tensor '{scalesName}' has dtype {scales.DType.ToHeaderName()}; " +
                    (fp32Only ? $"scales of layout {layout} are F32" : "scales are F16 or F32"));
            if (codes.Rank != 2 || codes.Shape[0] != rows || codes.Shape[1] != (long)blocks * format.BlockBytes())
                throw new InvalidDataException(
                    $"'{checkpoint.Directory}': tensor '{codesName}' has shape {codes.ShapeText}; [{rows}, {blocks * format.BlockBytes()}] expected " +
                    $"({rows} rows of {blocks} {format.Name()} blocks for K = {cols}){BlockCountHint(codes, format)}");
            if (scales.Rank != 2 || scales.Shape[0] != rows || scales.Shape[1] != blocks)
                throw new InvalidDataException(
                    $"'{checkpoint.Directory}': tensor '{scalesName}' has shape {scales.ShapeText}; [{rows}, {blocks}] expected ({blocks} {format.Name()} blocks per row for K = {cols})");
            return scales.DType == DType.F16
                ? new QuantizedMatrix(format, rows, cols, codes.Pointer, (Half*)scales.Pointer)
                : new QuantizedMatrix(format, rows, cols, codes.Pointer, (float*)scales.Pointer);
        }
        return null;
    }

    private static string BlockCountHint(in TensorData codes, QuantFormat format) =>
        codes.Rank == 2 && codes.Shape[1] % format.BlockBytes() == 0 ? $", i.e. {codes.Shape[1] / format.BlockBytes()} blocks per row" : "";

    /// <summary>Checks the metadata of the file holding <paramref name="tensorName"/>; returns its layout version.</summary>
    private static string CheckMetadata(SafetensorsCheckpoint checkpoint, string tensorName, QuantFormat format, string weightName)
    {
        foreach (var file in checkpoint.Files)
        {
            if (!file.Contains(tensorName)) continue;
            bool embedding = weightName.EndsWith("embed_tokens.weight", StringComparison.Ordinal);
            string key = embedding ? EmbeddingFormatKey : FormatKey;
            if (!file.Metadata.TryGetValue(key, out string? recorded))
                throw new InvalidDataException($"'{file.Path}': tensor '{tensorName}' is {format.Name()}-quantized but the file's metadata has no {key}");
            if (QuantFormats.Parse(recorded) != format)
                throw new InvalidDataException($"'{file.Path}': tensor '{tensorName}' is {format.Name()} but the file's metadata records {key} = '{recorded}'");
            if (!file.Metadata.TryGetValue(LayoutKey, out string? layout) || !IsKnownLayout(layout))
                throw new InvalidDataException($"'{file.Path}': tensor '{tensorName}': metadata {LayoutKey} is '{layout}' but this build reads '{LayoutVersion}' and '{LayoutVersionFp32}'");
            return layout!;
        }
        throw new InvalidDataException($"'{checkpoint.Directory}': no file holds tensor '{tensorName}'");
    }

    /// <summary>True for the weights the quantizer converts: every Linear weight of SigLIP, the projector and Gemma.</summary>
    public static bool IsLinearWeight(string name) =>
        name == "multi_modal_projector.linear.weight" ||
        (name.EndsWith(".weight", StringComparison.Ordinal) && (name.Contains(".self_attn.", StringComparison.Ordinal) || name.Contains(".mlp.", StringComparison.Ordinal))
            && (name.StartsWith("vision_tower.", StringComparison.Ordinal) || name.StartsWith("language_model.", StringComparison.Ordinal)));

    /// <summary>True for the tied embedding / LM head, stored q8 in both modes.</summary>
    public static bool IsEmbedding(string name) => name == "language_model.model.embed_tokens.weight";

    /// <summary>
    /// Writes a quantized copy of the checkpoint in <paramref name="sourceDirectory"/> (f32, bf16 or f16; single file or
    /// sharded) to <paramref name="outputDirectory"/>: one model.safetensors with the Linear weights in
    /// <paramref name="format"/>, the embedding in q8 and everything else (norms, biases, conv and position embeddings)
    /// unchanged; config.json, tokenizer files and other non-weight files are copied.
    /// </summary>
    public static void Write(string sourceDirectory, string outputDirectory, QuantFormat format, Action<string>? log = null,
        ScaleSelection scales = ScaleSelection.MinimumError)
    {
        using var checkpoint = SafetensorsCheckpoint.Open(sourceDirectory);
        if (FormatOf(checkpoint) is { } already)
            throw new InvalidDataException($"'{sourceDirectory}' is already quantized ({already.Name()}); quantize from the float checkpoint");
        Directory.CreateDirectory(outputDirectory);
        var writer = new SafetensorsWriter(Metadata(format)) { AlignToCacheLines = true };
        // The quantized matrices are held until the file is written (output size: about 1.1 or 0.56 bytes per weight).
        var held = new List<QuantizedMatrix>();
        foreach (string name in checkpoint.TensorNames.OrderBy(static n => n, StringComparer.Ordinal))
        {
            var tensor = checkpoint.Get(name);
            QuantFormat? target = IsEmbedding(name) ? QuantFormat.Q8 : IsLinearWeight(name) && tensor.Rank == 2 ? format : null;
            if (target is { } f)
            {
                if (!tensor.DType.IsKernelFloat())
                    throw new InvalidDataException($"'{sourceDirectory}': tensor '{name}' has dtype {tensor.DType.ToHeaderName()}; only F32, BF16 and F16 weights can be quantized");
                var matrix = Quantizer.Quantize(WeightMatrix.FromTensor(tensor), f, scales);
                held.Add(matrix);
                writer.Add(CodesName(name, f), f == QuantFormat.Q8 ? DType.I8 : DType.U8, [matrix.Rows, (long)matrix.BlocksPerRow * f.BlockBytes()],
                    stream => stream.Write(matrix.AllBlocks));
                writer.Add(ScalesName(name, f), matrix.ScaleType, [matrix.Rows, matrix.BlocksPerRow], stream => stream.Write(matrix.AllScaleBytes));
                log?.Invoke($"{name}: {tensor.DType.ToHeaderName()} {tensor.ShapeText} -> {f.Name()}" +
                    (matrix.ScaleType == DType.F16 ? "" : " (F32 scales: a block's scale is outside fp16's range)"));
            }
            else
            {
                writer.Add(name, tensor.DType, tensor.Shape, stream => CopyTensor(tensor, stream));
            }
        }
        writer.WriteTo(Path.Combine(outputDirectory, SafetensorsCheckpoint.SingleFileName));
        GC.KeepAlive(held);

        foreach (string file in Directory.EnumerateFiles(sourceDirectory))
        {
            string fileName = Path.GetFileName(file);
            if (fileName.EndsWith(".safetensors", StringComparison.Ordinal) || fileName == SafetensorsCheckpoint.IndexFileName)
                continue;
            File.Copy(file, Path.Combine(outputDirectory, fileName), overwrite: true);
        }
        // A stale index from an earlier sharded export in the same folder would shadow the new single file.
        string staleIndex = Path.Combine(outputDirectory, SafetensorsCheckpoint.IndexFileName);
        if (File.Exists(staleIndex)) File.Delete(staleIndex);
    }

    private static unsafe void CopyTensor(in TensorData tensor, Stream stream)
    {
        using var source = new UnmanagedMemoryStream(tensor.Pointer, tensor.ByteLength);
        source.CopyTo(stream, 1 << 20);
    }
}
