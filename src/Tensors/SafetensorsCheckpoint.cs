using System.Collections.ObjectModel;
using System.Text.Json;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>
/// The weights of a checkpoint folder, in the layouts Hugging Face writes: a single <c>model.safetensors</c>;
/// <c>model.safetensors.index.json</c> plus the shards its <c>weight_map</c> names; or, failing both, the one
/// <c>*.safetensors</c> file in the folder. Shards are memory-mapped (see <see cref="SafetensorsFile"/>) and
/// the index is cross-checked against the shard headers on open.
/// </summary>
public sealed class SafetensorsCheckpoint : IDisposable
{
    public const string SingleFileName = "model.safetensors";
    public const string IndexFileName = "model.safetensors.index.json";

    private readonly SafetensorsFile[] _files;
    private readonly Dictionary<string, SafetensorsFile> _fileOfTensor;
    private bool _disposed;

    private SafetensorsCheckpoint(string directory, string layoutFile, SafetensorsFile[] files, Dictionary<string, SafetensorsFile> fileOfTensor, List<string> names)
    {
        Directory = directory;
        LayoutFile = layoutFile;
        _files = files;
        _fileOfTensor = fileOfTensor;
        Files = new ReadOnlyCollection<SafetensorsFile>(files);
        TensorNames = new ReadOnlyCollection<string>(names);
    }

    /// <summary>Full path of the checkpoint folder.</summary>
    public string Directory { get; }

    /// <summary>The file that defined the layout: the index for a sharded checkpoint, else the single safetensors file.</summary>
    public string LayoutFile { get; }

    /// <summary>The mapped files (one, or the shards in index order).</summary>
    public IReadOnlyList<SafetensorsFile> Files { get; }

    /// <summary>All tensor names (file by file, each in header order).</summary>
    public IReadOnlyCollection<string> TensorNames { get; }

    /// <summary>Opens the checkpoint in <paramref name="directory"/>.</summary>
    /// <exception cref="DirectoryNotFoundException">The folder does not exist.</exception>
    /// <exception cref="FileNotFoundException">The folder holds no safetensors weights, or the index names a shard that is not there.</exception>
    /// <exception cref="InvalidDataException">A file is malformed or the index disagrees with the shards.</exception>
    public static SafetensorsCheckpoint Open(string directory)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        string folder = Path.GetFullPath(directory);
        if (!System.IO.Directory.Exists(folder))
        {
            throw File.Exists(folder)
                ? new DirectoryNotFoundException($"'{folder}' is a file; a checkpoint folder is expected")
                : new DirectoryNotFoundException($"'{folder}': checkpoint folder not found");
        }

        string single = Path.Combine(folder, SingleFileName);
        if (File.Exists(single)) return OpenSingle(folder, single);

        string index = Path.Combine(folder, IndexFileName);
        if (File.Exists(index)) return OpenSharded(folder, index);

        var candidates = System.IO.Directory.EnumerateFiles(folder)
            .Where(static f => f.EndsWith(".safetensors", StringComparison.Ordinal))
            .Order(StringComparer.Ordinal)
            .ToArray();
        return candidates.Length switch
        {
            1 => OpenSingle(folder, candidates[0]),
            0 => throw new FileNotFoundException(
                $"'{folder}': no {SingleFileName}, {IndexFileName} or other *.safetensors file in the folder", single),
            _ => throw new InvalidDataException(
                $"'{folder}': {candidates.Length} .safetensors files ({string.Join(", ", candidates.Select(Path.GetFileName))}) " +
                $"but no {IndexFileName} saying how they fit together"),
        };
    }

    public bool Contains(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        return _fileOfTensor.ContainsKey(name);
    }

    public bool TryGet(string name, out TensorData tensor)
    {
        ArgumentNullException.ThrowIfNull(name);
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_fileOfTensor.TryGetValue(name, out var file)) return file.TryGet(name, out tensor);
        tensor = default;
        return false;
    }

    /// <exception cref="KeyNotFoundException">No such tensor; the message names the tensor, the folder and the layout file.</exception>
    public TensorData Get(string name)
    {
        if (TryGet(name, out var tensor)) return tensor;
        throw new KeyNotFoundException($"'{Directory}': tensor '{name}' is not in the checkpoint (layout from '{Path.GetFileName(LayoutFile)}')");
    }

    /// <summary>
    /// The tensor <paramref name="name"/>, checked to exist with exactly <paramref name="expectedShape"/> and, when
    /// <paramref name="floatOnly"/>, a dtype the kernels read as floats (F32, BF16, F16). Used while loading a model.
    /// </summary>
    /// <exception cref="InvalidDataException">The tensor is missing or has the wrong shape or dtype.</exception>
    public TensorData Require(string name, ReadOnlySpan<long> expectedShape, bool floatOnly = true)
    {
        if (!TryGet(name, out var tensor))
            throw new InvalidDataException($"'{Directory}': tensor '{name}' is missing (expected shape {TensorData.FormatShape(expectedShape)})");

        string file = Path.GetFileName(tensor.Source);
        if (!expectedShape.SequenceEqual(tensor.Shape))
            throw new InvalidDataException(
                $"'{Directory}': tensor '{name}' in '{file}' has shape {tensor.ShapeText} but {TensorData.FormatShape(expectedShape)} is expected");
        if (floatOnly && !tensor.DType.IsKernelFloat())
            throw new InvalidDataException(
                $"'{Directory}': tensor '{name}' in '{file}' has dtype {tensor.DType.ToHeaderName()} but a floating-point dtype (F32, BF16, F16) is expected");
        return tensor;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var file in _files) file.Dispose();
    }

    private static SafetensorsCheckpoint OpenSingle(string folder, string path)
    {
        var file = SafetensorsFile.Open(path);
        var fileOfTensor = new Dictionary<string, SafetensorsFile>(file.TensorNames.Count, StringComparer.Ordinal);
        foreach (string name in file.TensorNames) fileOfTensor.Add(name, file);
        return new SafetensorsCheckpoint(folder, file.Path, [file], fileOfTensor, [.. file.TensorNames]);
    }

    private static SafetensorsCheckpoint OpenSharded(string folder, string indexPath)
    {
        var weightMap = ReadWeightMap(indexPath);

        // Shards in order of first mention, each with the first tensor mapped to it (for messages).
        var shardNames = new List<string>();
        var firstTensorOfShard = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var (tensor, shard) in weightMap)
        {
            if (firstTensorOfShard.TryAdd(shard, tensor)) shardNames.Add(shard);
        }

        var files = new List<SafetensorsFile>(shardNames.Count);
        try
        {
            foreach (string shard in shardNames)
            {
                if (shard.Length == 0 || shard is "." or ".." || Path.GetFileName(shard) != shard || shard.Contains('/') || shard.Contains('\\'))
                    throw new InvalidDataException(
                        $"'{indexPath}': shard '{shard}' (of tensor '{firstTensorOfShard[shard]}') must be a file name in the checkpoint folder");
                string shardPath = Path.Combine(folder, shard);
                if (!File.Exists(shardPath))
                    throw new FileNotFoundException(
                        $"'{indexPath}': shard '{shard}' (holding tensor '{firstTensorOfShard[shard]}') does not exist in '{folder}'", shardPath);
                files.Add(SafetensorsFile.Open(shardPath));
            }

            var fileOfShard = new Dictionary<string, SafetensorsFile>(StringComparer.Ordinal);
            for (int i = 0; i < shardNames.Count; i++) fileOfShard.Add(shardNames[i], files[i]);

            foreach (var (tensor, shard) in weightMap)
            {
                if (!fileOfShard[shard].Contains(tensor))
                    throw new InvalidDataException($"'{indexPath}': tensor '{tensor}' is mapped to '{shard}' but that shard does not hold it");
            }

            var fileOfTensor = new Dictionary<string, SafetensorsFile>(weightMap.Count, StringComparer.Ordinal);
            var names = new List<string>(weightMap.Count);
            foreach (var file in files)
            {
                foreach (string tensor in file.TensorNames)
                {
                    if (!fileOfTensor.TryAdd(tensor, file))
                        throw new InvalidDataException(
                            $"'{indexPath}': tensor '{tensor}' is in two shards, '{Path.GetFileName(fileOfTensor[tensor].Path)}' and '{Path.GetFileName(file.Path)}'");
                    names.Add(tensor);
                }
            }

            foreach (var file in files)
            {
                foreach (string tensor in file.TensorNames)
                {
                    if (!weightMap.ContainsKey(tensor))
                        throw new InvalidDataException(
                            $"'{indexPath}': shard '{Path.GetFileName(file.Path)}' holds tensor '{tensor}' but the weight_map does not list it");
                }
            }

            return new SafetensorsCheckpoint(folder, indexPath, [.. files], fileOfTensor, names);
        }
        catch
        {
            foreach (var file in files) file.Dispose();
            throw;
        }
    }

    private static Dictionary<string, string> ReadWeightMap(string indexPath)
    {
        SafetensorsIndexJson? index;
        try
        {
            ReadOnlySpan<byte> json = File.ReadAllBytes(indexPath);
            // Tolerate the UTF-8 byte order mark some Windows editors add; the JSON reader does not skip it.
            if (json.StartsWith("\uFEFF"u8)) json = json[3..];
            index = JsonSerializer.Deserialize(json, SafetensorsIndexJsonContext.Default.SafetensorsIndexJson);
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"'{indexPath}': not a valid safetensors index: {e.Message}", e);
        }

        if (index?.WeightMap is not { Count: > 0 } weightMap)
            throw new InvalidDataException($"'{indexPath}': the index has no weight_map entries");
        foreach (var (tensor, shard) in weightMap)
        {
            if (shard is null)
                throw new InvalidDataException($"'{indexPath}': tensor '{tensor}' has no shard file name in the weight_map");
        }

        return weightMap;
    }
}
