using System.Diagnostics;
using PaliGemma.CpuOnly.Model.Imaging;
using PaliGemma.CpuOnly.Model.Text;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model;

/// <summary>Intermediate vision tensors, filled when a caller asks for them (reference tests, debugging).</summary>
public sealed class VisionTrace
{
    /// <summary>SigLIP last hidden state [B, tokens, vision hidden].</summary>
    public float[]? LastHiddenState { get; set; }
    /// <summary>Projector output before the 1/sqrt(text hidden) scaling [B, tokens, text hidden].</summary>
    public float[]? ProjectorOutput { get; set; }
}

/// <summary>
/// A loaded PaliGemma checkpoint: config, tokenizer, SigLIP tower, projector and Gemma decoder over memory-mapped weights.
/// Immutable after loading and safe to share between threads; per-request state lives in <see cref="KvCache"/>s.
/// </summary>
public sealed class PaliGemmaModel : IDisposable
{
    private readonly SafetensorsCheckpoint _checkpoint;

    private PaliGemmaModel(string directory, PaliGemmaConfig config, SafetensorsCheckpoint checkpoint, PaliGemmaTokenizer tokenizer, TimeSpan loadTime)
    {
        Directory = directory;
        Config = config;
        _checkpoint = checkpoint;
        Tokenizer = tokenizer;
        Vision = new SigLipVisionTower(config.Vision, checkpoint);
        Projector = new MultiModalProjector(config.Vision.HiddenSize, config.ProjectionDim, checkpoint);
        Decoder = new GemmaDecoder(config.Text, checkpoint);
        LoadTime = loadTime;
    }

    public string Directory { get; }
    public PaliGemmaConfig Config { get; }
    public PaliGemmaTokenizer Tokenizer { get; }
    public SigLipVisionTower Vision { get; }
    public MultiModalProjector Projector { get; }
    public GemmaDecoder Decoder { get; }
    public TimeSpan LoadTime { get; private set; }

    public int ImageSize => Config.Vision.ImageSize;
    public int NumImageTokens => Config.NumImageTokens;

    /// <summary>
    /// Opens a Hugging Face PaliGemma folder (config.json, model.safetensors or sharded safetensors with an index, tokenizer.model).
    /// Every tensor the model needs is checked for presence and shape; weights stay memory-mapped.
    /// </summary>
    /// <param name="tokenizerPath">tokenizer.model to use instead of the one in the folder (for weight-only folders).</param>
    public static PaliGemmaModel Load(string directory, string? tokenizerPath = null)
    {
        var clock = Stopwatch.StartNew();
        if (!System.IO.Directory.Exists(directory))
            throw new DirectoryNotFoundException($"'{directory}': model folder not found");
        var config = PaliGemmaConfig.Load(Path.Combine(directory, "config.json"));
        tokenizerPath ??= Path.Combine(directory, "tokenizer.model");
        if (!File.Exists(tokenizerPath))
            throw new FileNotFoundException($"'{tokenizerPath}': tokenizer.model not found (the SentencePiece model shipped with PaliGemma checkpoints)", tokenizerPath);
        var tokenizer = PaliGemmaTokenizer.Load(tokenizerPath);
        if (tokenizer.ImageTokenId != config.ImageTokenIndex)
            throw new InvalidDataException($"'{directory}': tokenizer.model maps <image> to {tokenizer.ImageTokenId} but config.json says image_token_index {config.ImageTokenIndex}");
        if (tokenizer.PieceCount > config.Text.VocabSize)
            throw new InvalidDataException($"'{directory}': tokenizer.model has {tokenizer.PieceCount} pieces but the embeddings have only {config.Text.VocabSize} rows");

        var checkpoint = SafetensorsCheckpoint.Open(directory);
        try
        {
            var model = new PaliGemmaModel(directory, config, checkpoint, tokenizer, TimeSpan.Zero);
            model.LoadTime = clock.Elapsed;
            return model;
        }
        catch
        {
            checkpoint.Dispose();
            throw;
        }
    }

    /// <summary>Pixel values [3, S, S] for one image, as the PaliGemma processor computes them.</summary>
    public float[] Preprocess(RgbImage image) => ImagePreprocessor.ToPixelValues(image, ImageSize);

    /// <summary>
    /// Image features for the decoder [B, image tokens, text hidden]: SigLIP, projector, then divided by sqrt(text hidden) as
    /// the reference does before the decoder multiplies all embeddings by sqrt(hidden).
    /// </summary>
    public float[] EncodeImages(ReadOnlySpan<float> pixelValues, int images, VisionTrace? trace = null, CancellationToken cancellationToken = default)
    {
        int tokens = NumImageTokens, vh = Config.Vision.HiddenSize, th = Config.Text.HiddenSize;
        var visionStates = new float[images * tokens * vh];
        Vision.Encode(pixelValues, images, visionStates, cancellationToken);
        var features = new float[images * tokens * th];
        Projector.Forward(visionStates, images * tokens, features);
        if (trace is not null)
        {
            trace.LastHiddenState = visionStates;
            trace.ProjectorOutput = (float[])features.Clone();
        }
        float divisor = MathF.Sqrt(th);
        for (int i = 0; i < features.Length; i++) features[i] /= divisor;
        return features;
    }

    public void Dispose() => _checkpoint.Dispose();
}
